"""The FiRe-MPO loss path under FSDP2 (torch's ``fully_shard``) on two CPU gloo ranks, against one process without
sharding, on the tiny Llava, with the model sharded by hand: the whole trainer under accelerate's FSDP2 plugin
is in test_engines.py.

Each decoder layer (the classes of ``_no_split_modules``) is its own FSDP module and the root holds the rest:
embeddings, vision tower, projector and ``lm_head``, which between forwards is a ``DTensor`` shard on each rank.
The policy's head and the fused loss run inside the root's forward (``model(firempo=request)``), where FSDP2 has
all-gathered the root's parameters. In the ``head_apart`` run ``lm_head`` is a unit of its own, as accelerate's
plugin shards it: still a shard inside the root's forward, gathered by the loss through FSDP's ``unshard``, its
gradient reduce-scattered at the end of the backward. The frozen reference model is one FSDP module, as TRL's
``prepare_fsdp`` shards it, and its head is read outside any forward, so it is gathered into a whole copy. With
tied embeddings the head is the input embedding's tensor (that run also recomputes the decoder layers in the
backward: non-reentrant gradient checkpointing, on both sides). A LoRA policy (peft around the model, sharded
alike) takes the policy with its adapters off as its reference.

Both sides see the same four examples per optimizer step: 2 ranks x 1 example x 2 accumulation steps against 1
process x 2 examples x 2 accumulation steps. The ranks pack each example's two rows on their shared prefix,
the one process does not. Plain SGD, so that each step's weight change is the learning rate times the gradient:
the per-step losses and every tensor's change over two steps agree to 1e-5 relative (norm-wise), a check of
the gradients that reach each shard through FSDP's reduce-scatter, not only of the forward.

This file is also the worker that each rank runs (``python -m torch.distributed.run ... this file``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from firempo_kernels import integrations
from test_trainer_distributed import RTOL, free_port, launch

pytestmark = pytest.mark.slow  # multi-rank launches, tens of seconds each
FSDP2_CONFIG = Path(integrations.__file__).parent / "configs" / "accelerate" / "fsdp2.yaml"
STEPS, WINDOW, ACCUMULATION, LR = 2, 4, 2, 0.5
VARIANTS = ("untied", "tied_checkpointed", "lora", "head_apart")


def _worker(out: Path, seed: int, variant: str) -> None:
    """Train ``STEPS`` SGD steps with :func:`compute_firempo_loss`, sharded when launched on several ranks; rank 0
    writes the per-step losses and the whole weights before and after. ``variant``: one of :data:`VARIANTS`
    (``head_apart``: the policy's ``lm_head`` an FSDP module of its own, kept gathered after its forward, as
    accelerate's FSDP2 plugin shards it)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from firempo_kernels.integrations.batch import PreferenceCollator
    from firempo_kernels.integrations.forward import compute_firempo_loss
    from firempo_kernels.integrations.models import unwrap_model
    from firempo_kernels.integrations.reference import ADAPTERS_DISABLED
    from firempo_kernels.integrations.smoke import synthetic_examples, tiny_model
    from firempo_kernels.losses import FiReMPOLoss

    torch.set_num_threads(1)
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    tied = variant == "tied_checkpointed"
    policy = tiny_model("llava", seed=seed, tie_word_embeddings=tied).train()
    if tied:
        assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight
    data = synthetic_examples(policy.config, STEPS * WINDOW, seed=seed, corrupted_every=2)
    if tied:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "lora":
        import peft

        torch.manual_seed(seed)  # the adapters' A
        policy = peft.get_peft_model(policy, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]))
        reference = ADAPTERS_DISABLED
    else:
        reference = tiny_model("llava", seed=seed + 1, tie_word_embeddings=tied)
    if sharded:
        if variant == "head_apart":
            fully_shard(policy.get_output_embeddings(), reshard_after_forward=False)
        layers = set(unwrap_model(policy)._no_split_modules)
        for module in policy.modules():
            if type(module).__name__ in layers:
                fully_shard(module)
        fully_shard(policy)
        if variant != "lora":
            fully_shard(reference)  # one group, as TRL's prepare_fsdp shards a reference model under FSDP2

    def whole() -> dict[str, torch.Tensor]:
        return {name: (p.full_tensor() if sharded else p).detach().clone()
                for name, p in policy.state_dict().items()}

    before = whole()
    head = policy.get_output_embeddings().weight
    assert sharded == (type(head).__name__ == "DTensor"), type(head)
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    loss_fn = FiReMPOLoss(beta=0.5, alpha=0.2, gamma=0.5, lambda_=0.3)
    collate = PreferenceCollator(unwrap_model(policy).config.text_config.pad_token_id)
    per_micro = WINDOW // (world * ACCUMULATION)
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(ACCUMULATION):
            start = step * WINDOW + (micro * world + rank) * per_micro
            batch = collate(data[start:start + per_micro])
            # Every rank makes the same model calls (FSDP's gathers are collectives): the v' pass always runs.
            result = compute_firempo_loss(policy, reference, batch, loss_fn, shared_prefix=sharded,
                                          num_examples_in_batch=WINDOW // world, corrupted_pass=True)
            result.loss.backward()  # FSDP2 averages the ranks' gradients in its reduce-scatter
            total += result.loss.detach()
        if sharded:
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = whole()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps(losses))
        save_file({k: v.contiguous() for k, v in before.items()}, str(out / "before.safetensors"))
        save_file({k: v.contiguous() for k, v in after.items()}, str(out / "after.safetensors"))
    if sharded:
        dist.destroy_process_group()


def _train(out: Path, seed: int, variant: str, ranks: int) -> Path:
    script = [__file__, "--out", str(out), "--seed", str(seed), "--variant", variant]
    port = free_port()
    cmd = [sys.executable, *script] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
        *script]
    [(code, output)] = launch([cmd], f"{ranks}-rank run", port)
    if code != 0:
        pytest.fail(f"{ranks}-rank run failed:\n{output[-9000:]}")
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp2_two_ranks_equal_one_process(tmp_path, variant):
    """Full fine-tuning with a frozen reference model (untied; tied embeddings with gradient checkpointing; the
    head a unit of its own, which the loss gathers), and a LoRA policy whose reference is the policy with its
    adapters off."""
    from safetensors.torch import load_file

    seed = int(torch.randint(0, 2**20, ()))
    print(f"data and model seed {seed}")
    sharded, plain = _train(tmp_path / "fsdp2", seed, variant, 2), _train(tmp_path / "plain", seed, variant, 1)
    losses = json.loads((sharded / "losses.json").read_text()), json.loads((plain / "losses.json").read_text())
    assert len(losses[0]) == STEPS
    assert losses[0] == pytest.approx(losses[1], rel=RTOL, abs=0)
    start = load_file(str(plain / "before.safetensors"))
    ends = load_file(str(sharded / "after.safetensors")), load_file(str(plain / "after.safetensors"))
    assert ends[0].keys() == ends[1].keys() == start.keys()
    torch.testing.assert_close(load_file(str(sharded / "before.safetensors")), start, rtol=0, atol=0)
    changes = {name: (ends[0][name] - begin, ends[1][name] - begin) for name, begin in start.items()}
    # A gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise whose size
    # follows the terms summed, so each tensor also gets 1e-7 of the whole update's norm.
    total = torch.cat([expected.flatten() for _, expected in changes.values()]).norm().item()
    for name, (change, expected) in changes.items():
        assert torch.isfinite(change).all(), name
        error, scale = (change - expected).norm().item(), expected.norm().item()
        assert error <= RTOL * scale + 1e-7 * total, f"{name}: |diff| {error:.3e}, |change| {scale:.3e}"
    trained = [name for name, (_, expected) in changes.items() if expected.norm() > 1e-3 * total]
    if variant == "lora":
        assert trained and all("lora_" in name for name in trained), trained
        assert any("lora_A" in name for name in trained) and any("lora_B" in name for name in trained)
    else:
        assert "lm_head.weight" in trained or "model.language_model.embed_tokens.weight" in trained


def test_the_shipped_accelerate_config_launches_fsdp2_with_transformer_layer_wrap(monkeypatch):
    """``accelerate launch --config_file integrations/configs/accelerate/fsdp2.yaml`` hands each rank the
    settings of accelerate's FSDP2 plugin that the runs above shard by: version 2, one FSDP module per decoder
    layer, the whole state dict gathered for saving, fp32."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    port = free_port()
    [(code, output)] = launch([[str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                                str(FSDP2_CONFIG), "--num_processes", "1", "--main_process_port", str(port), __file__,
                                "--show_launch"]], "accelerate launch", port)
    assert code == 0, output[-3000:]
    launched = json.loads(next(line for line in reversed(output.splitlines()) if line.startswith('{"')))
    assert launched["ACCELERATE_USE_FSDP"] == "true" and launched["ACCELERATE_MIXED_PRECISION"] == "no"
    for key, value in launched.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is not None and "transformer" in str(plugin.auto_wrap_policy)
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


if __name__ == "__main__":
    if sys.argv[1:] == ["--show_launch"]:
        print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(("FSDP_", "ACCELERATE_"))}))
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    options = parser.parse_args()
    _worker(options.out, options.seed, options.variant)
