"""The packed forward (one prefix, two responses) against the unpacked one, for every registered family and
the attention implementations that run here: the same hidden states at every position of every row, the
same loss and gradients.

Tolerances: 1e-5 absolute on hidden states of norm ~3 per element (fp32): both forwards compute the same
sums over the same keys, only in another order and with other matrix shapes (observed <= 5e-7); the loss and
every gradient 1e-5 relative, as for the other reorderings of this project (tests/test_trl_trainer.py).
"""

import logging

import pytest
import torch

from firempo_kernels import FiReMPOLoss
from firempo_kernels.integrations import packing
from firempo_kernels.integrations.batch import PreferenceCollator, PreferenceExample
from firempo_kernels.integrations.forward import block_hidden_states, compute_firempo_loss
from firempo_kernels.integrations.models import get_adapter
from firempo_kernels.integrations.smoke import synthetic_rows, tiny_model, tiny_processor
from firempo_kernels.integrations.trl import FiReMPOCollator

FAMILIES = ["llama", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "paligemma2", "llava_next",
            "llava_onevision", "idefics3", "internvl", "gemma4", "mistral3", "smolvlm"]


def mixed_batch(family: str, seed: int):
    """Five examples of different prompt and response lengths (so rows pad differently), only some with v'."""
    rows = []
    for prompt_len, response_len, n in ((3, 6, 2), (9, 3, 2), (5, 10, 1)):
        data = synthetic_rows(family, num_examples=n, seed=seed + prompt_len, corrupted_every=2,
                              prompt_len=prompt_len, response_len=response_len)
        rows += [dict(data[i], id=f"{prompt_len}-{i}") for i in range(n)]
    collator = FiReMPOCollator(tiny_processor(family), corrupted_pass=family != "llama")
    return collator(rows)["batch"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_hidden_states_equal_unpacked_at_every_position(family, attn):
    seed = int(torch.randint(0, 2**20, ()))
    model = tiny_model(family, seed=seed, attn_implementation=attn)
    batch = mixed_batch(family, seed)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # rows of different lengths, right-padded
    corrupted = batch.corrupted_images is not None
    adapter = get_adapter(model)
    with torch.no_grad():
        unpacked = block_hidden_states(adapter, model, batch, corrupted, shared_prefix=False)
        packed = block_hidden_states(adapter, model, batch, corrupted, shared_prefix=True)
    assert packed.shape == unpacked.shape
    real = batch.attention_mask[:, :-1].bool().repeat(2 if corrupted else 1, 1)
    assert (packed - unpacked)[real].abs().max() <= 1e-5
    layout = packing.pack_layout(batch)
    assert layout.input_ids.shape[1] < 2 * batch.input_ids.shape[1]  # the prefix is run once
    assert (layout.segment == 0).sum() > 0


def test_rows_that_share_nothing_pack_too():
    model = tiny_model("llama", attn_implementation="eager")

    def example(i: int, first: int) -> PreferenceExample:
        ids = torch.tensor([first, 5, 6, 7 + i])
        labels, weights = ids.clone(), torch.ones(4)
        return PreferenceExample(f"e{i}", ids, labels, weights, torch.tensor([first + 1, 5, 6]), torch.tensor(
            [first + 1, 5, 6]), torch.ones(3))

    batch = PreferenceCollator(0)([example(0, 10), example(1, 20)])
    adapter = get_adapter(model)
    layout = packing.pack_layout(batch)
    assert (layout.segment == 0).sum() == 0  # nothing in common from the first token on
    with torch.no_grad():
        unpacked = block_hidden_states(adapter, model, batch, False, shared_prefix=False)
        packed = block_hidden_states(adapter, model, batch, False, shared_prefix=True)
    real = batch.attention_mask[:, :-1].bool()
    assert (packed - unpacked)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("family, checkpointing", [(f, False) for f in FAMILIES] + [("qwen2_5_vl", True)])
def test_loss_and_gradients_equal_unpacked(family, checkpointing):
    seed = int(torch.randint(0, 2**20, ()))
    policy = tiny_model(family, seed=seed).train()
    reference = tiny_model(family, seed=seed + 1)
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = mixed_batch(family, seed)
    loss_fn = FiReMPOLoss(alpha=0.1, gamma=0.5)
    results = []
    for shared in (False, True):
        policy.zero_grad(set_to_none=True)
        out = compute_firempo_loss(policy, reference, batch, loss_fn, shared_prefix=shared)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.metrics, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a.item(), rel=1e-5)
    for key in ("kl/forward", "rewards/margins") + (("loss/visual",) if family != "llama" else ()):
        assert metrics_b[key].item() == pytest.approx(metrics_a[key].item(), rel=1e-4, abs=1e-7), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    # Per tensor 1e-5 of its gradient, plus 1e-7 of the whole gradient's norm (as in test_models.py): fp32
    # rounding follows the size of the terms summed, which shows in a tensor whose gradient nearly cancels
    # (a vision tower run once per image packed, twice unpacked, sums its two rows' terms in another order).
    total = torch.cat([g.flatten() for g in grads_a.values()]).norm()
    for name, g in grads_a.items():
        assert (grads_b[name] - g).norm() <= 1e-5 * g.norm() + 1e-7 * total, name


def test_an_attention_that_cannot_take_the_mask_runs_unpacked_said_once(monkeypatch, caplog):
    model = tiny_model("llama", attn_implementation="sdpa")
    assert packing.can_pack(model)
    monkeypatch.setattr(packing, "attention_implementation", lambda m: "flash_attention_2")
    monkeypatch.setattr(packing, "_SAID", set())
    batch = mixed_batch("llama", 0)
    adapter = get_adapter(model)
    with caplog.at_level(logging.WARNING, logger=packing.__name__), torch.no_grad():
        for _ in range(2):
            hidden = block_hidden_states(adapter, model, batch, False, shared_prefix=True)
    said = [r.message for r in caplog.records if "shared_prefix" in r.message]
    assert len(said) == 1 and "flash_attention_2" in said[0] and "in full" in said[0]
    expected = block_hidden_states(adapter, model, batch, False, shared_prefix=False)
    assert torch.equal(hidden, expected)
