"""Every image-text family beyond Llava and Qwen-VL, end to end on tiny random models and the families' own
processors (tiny ones, built offline): the adapter's hidden states times the head are the model's own logits,
the fused loss equals the loss computed in float64 from those logits, and the trainer trains each family from
a folder saved and loaded back as a user's checkpoint is, with its precomputed reference equal to the live one.
The packed forward of these families is checked in test_packing.py, ZeRO-3 in test_trainer_distributed.py.

What the families' processors hand the model is written here from docs/families.md, independently of the
adapters: Gemma 3 marks its image placeholders with ``token_type_ids`` = 1, PaliGemma its answer (0 on the
image, ``<bos>`` and prompt, 1 on the answer).
"""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset
from PIL import Image

from firempo_kernels.integrations.forward import compute_firempo_loss
from firempo_kernels.integrations.models import get_adapter, loss_takes_softcap
from firempo_kernels.integrations.smoke import synthetic_rows, tiny_model, tiny_processor
from firempo_kernels.integrations.trl import FiReMPOCollator, FiReMPOConfig, FiReMPOTrainer
from firempo_kernels.losses import FiReMPOLoss
from test_models import firempo_loss_from_logits

pytestmark = pytest.mark.usefixtures("one_thread")
os.environ.setdefault("TQDM_DISABLE", "1")

FAMILIES = ["gemma3", "paligemma", "paligemma2", "llava_next", "llava_onevision", "idefics3", "qwen3_5", "internvl",
            "gemma4", "mistral3", "smolvlm"]
#: families whose processor takes rows without an image (PaliGemma's refuses them)
TEXT_ONLY = ["gemma3", "llava_next", "llava_onevision", "idefics3", "qwen3_5", "internvl", "gemma4", "mistral3",
             "smolvlm"]
#: families whose saved processor loads back through AutoProcessor here; LlavaOnevision's, Qwen3.5's, InternVL's,
#: Gemma 4's and SmolVLM's stock processors hold a video processor, which needs torchvision (not installed), so
#: their tiny ones are images-only subclasses; Mistral 3's PixtralProcessor imports torchvision, so its tiny one
#: is a class of its own
RELOADS = ["gemma3", "paligemma", "paligemma2", "llava_next", "idefics3"]
#: the adapter each family must get
ADAPTER = {"gemma3": "Gemma3Adapter", "paligemma": "PaliGemmaAdapter", "paligemma2": "PaliGemmaAdapter",
           "llava_next": "LlavaAdapter", "llava_onevision": "LlavaAdapter", "idefics3": "Idefics3Adapter",
           "qwen3_5": "QwenVLAdapter", "internvl": "LlavaAdapter", "gemma4": "Gemma4Adapter",
           "mistral3": "LlavaAdapter", "smolvlm": "Idefics3Adapter"}
IGNORE = -100


def draw_seed() -> int:
    return int(torch.randint(0, 2**20, ()))


def image(gen: torch.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())


def rows_for(family: str, seed: int, *, images: bool = True) -> list[dict]:
    """Five rows of different prompt and response lengths (so they pad differently), v' on some, images of
    three shapes (so that anyres tiles, split images and pixel masks differ between rows and are padded)."""
    rows = []
    for prompt_len, response_len, n in ((3, 6, 2), (7, 3, 2), (5, 8, 1)):
        data = synthetic_rows(family, num_examples=n, seed=seed + prompt_len, corrupted_every=2,
                              prompt_len=prompt_len, response_len=response_len)
        rows += [dict(data[i], id=f"{prompt_len}-{i}") for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    for i, row in enumerate(rows):
        size = ((16, 16), (16, 32), (32, 16))[i % 3]
        row["images"] = [image(gen, *size)]
        row["corrupted_images"] = [image(gen, *size)] if row["corrupted_images"] else []
    if not images:
        rows = [dict(r, images=[], corrupted_images=[]) for r in rows]
    return rows


def batch_for(family: str, seed: int, *, images: bool = True):
    collator = FiReMPOCollator(tiny_processor(family), corrupted_pass=images)
    return collator(rows_for(family, seed, images=images))["batch"]


def model_inputs(family: str, model, batch, images) -> dict[str, torch.Tensor]:
    """What the family's processor hands its model for the 2B rows (docs/families.md), not the adapter's."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    inputs.update({k: torch.cat((v, v)) for k, v in images.items()})
    if family == "gemma3":
        inputs["token_type_ids"] = (batch.input_ids == model.config.image_token_id).long()
    if family.startswith("paligemma"):
        inputs["token_type_ids"] = (batch.labels != IGNORE).long()  # the answer: every labelled token
    if family in ("qwen3_5", "gemma4"):
        inputs["mm_token_type_ids"] = (batch.input_ids == model.config.image_token_id).int()
    return inputs


@pytest.mark.parametrize("family", ["gemma3", "gemma4", "qwen3_5", "paligemma", "paligemma2"])  # with token types
def test_the_processor_marks_tokens_as_the_rule_says(family):
    """The rules of :func:`model_inputs` are the processors' own: Gemma 3's processor sets token_type_ids = 1
    (Gemma 4's and Qwen3.5's mm_token_type_ids = 1) on exactly the image placeholders, PaliGemma's
    token_type_ids on exactly the suffix (the answer)."""
    processor = tiny_processor(family)
    row = synthetic_rows(family, 1, seed=draw_seed())[0]
    if not family.startswith("paligemma"):
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": row["prompt"]}]}], tokenize=False, add_generation_prompt=True)
        out = processor(text=[text], images=[row["images"]], return_tensors="pt")
        key = "token_type_ids" if family == "gemma3" else "mm_token_type_ids"
        expected = (out["input_ids"] == tiny_model(family).config.image_token_id).long()
        assert expected.sum() > 0 and torch.equal(out[key].long(), expected)
        return
    else:
        prompt = processor(text=[row["prompt"]], images=[row["images"]], return_tensors="pt")["input_ids"]
        out = processor(text=[row["prompt"]], images=[row["images"]], suffix=["a lesion"], return_tensors="pt")
        expected = (torch.arange(out["input_ids"].shape[1]) >= prompt.shape[1]).long()[None]
        assert torch.equal(out["input_ids"][:, : prompt.shape[1]], prompt)
    assert expected.sum() > 0 and torch.equal(out["token_type_ids"], expected)


def check_logits(family, model, batch, images):
    adapter = get_adapter(model)
    assert type(adapter).__name__ == ADAPTER[family]
    with torch.no_grad():
        logits = model(**model_inputs(family, model, batch, images)).logits
        hidden = adapter.hidden_states(model, batch.input_ids, batch.attention_mask,
                                       {k: torch.cat((v, v)) for k, v in images.items()},
                                       prompt_lengths=batch.prompt_lengths)
        weight, bias = adapter.head(model)
        ours = F.linear(hidden, weight, bias)
    cap = adapter.logit_softcap(model)
    assert cap == getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:
        ours = cap * torch.tanh(ours / cap)
    real = batch.attention_mask.bool()
    # The same modules on the same inputs; only the head's product may be blocked otherwise: fp32 rounding
    # of a 32-term dot product, far below 1e-5 of the logits' size.
    error = (ours - logits)[real].abs().max().item()
    assert error <= 1e-5 * logits[real].abs().max().item(), error
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_times_head_are_the_models_logits(family):
    seed = draw_seed()
    model = tiny_model(family, seed=seed)
    batch = batch_for(family, seed)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1 and batch.images  # right-padded rows, with images
    check_logits(family, model, batch, batch.images)
    check_logits(family, model, batch, batch.corrupted_images)


@pytest.mark.parametrize("family", TEXT_ONLY)
def test_text_only_rows_are_exact_too(family):
    seed = draw_seed()
    batch = batch_for(family, seed, images=False)
    assert not batch.images
    check_logits(family, tiny_model(family, seed=seed), batch, {})


def test_token_types_matter():
    """Without Gemma 3's token_type_ids or Gemma 4's mm_token_type_ids (image tokens attend each other both
    ways) or PaliGemma's token_type_ids (its prompt does), the logits change: the exactness is not vacuous."""
    for family in ("gemma3", "gemma4", "paligemma"):
        seed = draw_seed()
        model, batch = tiny_model(family, seed=seed), batch_for(family, seed)
        inputs = model_inputs(family, model, batch, batch.images)
        with torch.no_grad():
            with_types = model(**inputs).logits
            inputs.pop("mm_token_type_ids" if family == "gemma4" else "token_type_ids")
            without = model(**inputs).logits
        assert (with_types - without)[batch.attention_mask.bool()].abs().max() > 1e-3, family


def test_a_model_with_recurrent_layers_runs_unpacked_said_once(monkeypatch, caplog):
    """Qwen3.5's gated-delta-net layers carry a state along the row: a packed row would hand the chosen
    response's state to the rejected one, so it runs both rows in full, and says so once."""
    import logging

    from firempo_kernels.integrations import packing
    from firempo_kernels.integrations.forward import block_hidden_states

    monkeypatch.setattr(packing, "_SAID", set())
    model = tiny_model("qwen3_5")
    batch = batch_for("qwen3_5", 0)
    adapter = get_adapter(model)
    with caplog.at_level(logging.WARNING, logger=packing.__name__), torch.no_grad():
        for _ in range(2):
            hidden = block_hidden_states(adapter, model, batch, False, shared_prefix=True)
    said = [r.message for r in caplog.records if "shared_prefix" in r.message]
    assert len(said) == 1 and "Qwen3_5Model" in said[0]
    with torch.no_grad():
        assert torch.equal(hidden, block_hidden_states(adapter, model, batch, False, shared_prefix=False))


def test_rows_longer_than_the_window_of_a_one_mask_model_run_unpacked(monkeypatch, caplog):
    """PaliGemma 2 takes one mask for its global and sliding-window layers: a batch with a row longer than the
    window runs unpacked, said once, and gives the unpacked hidden states."""
    import logging

    from firempo_kernels.integrations import packing
    from firempo_kernels.integrations.forward import block_hidden_states

    monkeypatch.setattr(packing, "_SAID", set())
    model = tiny_model("paligemma2")
    model.config.text_config.sliding_window = 6  # shorter than the rows
    batch = batch_for("paligemma2", 0)
    adapter = get_adapter(model)
    with caplog.at_level(logging.WARNING, logger=packing.__name__), torch.no_grad():
        hidden = block_hidden_states(adapter, model, batch, False, shared_prefix=True)
        expected = block_hidden_states(adapter, model, batch, False, shared_prefix=False)
    said = [r.message for r in caplog.records if "shared_prefix" in r.message]
    assert len(said) == 1 and "sliding window (6)" in said[0]
    assert torch.equal(hidden, expected)


def test_paligemma_needs_where_the_prompt_ends():
    model = tiny_model("paligemma")
    batch = batch_for("paligemma", 0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        get_adapter(model).hidden_states(model, batch.input_ids, batch.attention_mask,
                                         {k: torch.cat((v, v)) for k, v in batch.images.items()})


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_equals_the_loss_of_the_models_logits(family, shared_prefix):
    seed = draw_seed()
    policy, reference = tiny_model(family, seed=seed).train(), tiny_model(family, seed=seed + 1)
    batch = batch_for(family, seed)
    hp = dict(beta=0.5, alpha=0.3, gamma=0.7, lambda_=0.3)
    out = compute_firempo_loss(policy, reference, batch, FiReMPOLoss(**hp), shared_prefix=shared_prefix)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)

    cap = get_adapter(policy).logit_softcap(policy)

    def logits(model, grad):
        """float64 logits from the head's input in the model's own forward (captured by a hook), soft-capped
        in float64: the model's fp32 cap loses the gradient of saturated logits to 1 - tanh^2 cancellation."""
        seen = []
        hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
        with torch.set_grad_enabled(grad):
            for imgs in (batch.images, batch.corrupted_images):
                model(**model_inputs(family, model, batch, imgs))
        hook.remove()
        head = model.get_output_embeddings()
        s = F.linear(torch.cat(seen)[:, :-1].double(), head.weight.double())
        return s if cap is None else cap * torch.tanh(s / cap)

    expected = firempo_loss_from_logits(logits(policy, True), logits(reference, False),
                                        batch.labels[:, 1:].repeat(2, 1), batch.span_weights[:, 1:].repeat(2, 1),
                                        batch.has_corrupted_image, **hp)
    expected.backward()
    # As in test_models: fp32 sums over a few dozen span tokens against float64, ~1e-7 relative; the model's
    # own fp32 logits equal the head's product (test above), so float64 products of its input are the truth.
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=0.0)
    total = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).norm().item()
    assert fused.keys() == {n for n, p in policy.named_parameters() if p.grad is not None}
    for name, p in policy.named_parameters():
        if p.grad is not None:
            error, scale = (fused[name] - p.grad).norm().item(), p.grad.norm().item()
            assert error <= 1e-5 * scale + 1e-7 * total, f"{name}: |diff| {error:.3e}, |grad| {scale:.3e}"


OUR_METRICS = ("kl/forward", "kl/reverse", "loss/rank", "loss/visual", "loss/kl", "visual/margins", "span_tokens")
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def trainer_args(out, **kwargs):
    # Adam with eps = 1 (as in test_trainer_distributed.py): its step is then linear in gradients far below 1,
    # so the rounding noise of a gradient that is zero in exact arithmetic stays noise instead of becoming a
    # full step of either sign, and step 2 of two runs compares the reference, not Adam's noise amplification.
    return FiReMPOConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-1,
                         adam_epsilon=1.0,
                         logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, seed=0, beta=0.5, max_length=None, **kwargs)


def saved_family(family: str, folder) -> str:
    """A tiny model and its processor saved as a user's checkpoint is."""
    tiny_model(family, seed=1).save_pretrained(folder)
    tiny_processor(family).save_pretrained(folder)
    return str(folder)


def step_rows(trainer):
    return [row for row in trainer.state.log_history if "loss" in row and "train_loss" not in row]


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_from_a_saved_folder_and_a_precomputed_reference_equals_the_live_one(family, tmp_path):
    folder = saved_family(family, tmp_path / "model")
    data = Dataset.from_list(rows_for(family, draw_seed())[:4])

    def train(**extra):
        model = transformers.AutoModelForImageTextToText.from_pretrained(folder)
        # processing_class left out where it reloads: the trainer loads the folder's with AutoProcessor
        processor = {} if family in RELOADS else {"processing_class": tiny_processor(family)}
        trainer = FiReMPOTrainer(model, args=trainer_args(tmp_path / "out", **extra), train_dataset=data,
                                 **processor)
        assert type(trainer.processing_class) is type(tiny_processor(family))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert moved
        return step_rows(trainer)

    live = train()
    assert len(live) == 2
    for row in live:
        missing = [m for m in (*OUR_METRICS, *TRL_METRICS) if m not in row]
        assert not missing, missing
        assert all(torch.isfinite(torch.tensor(row[m])) for m in (*OUR_METRICS, *TRL_METRICS))
    stored = train(reference_mode="precomputed", precomputed_reference_dir=str(tmp_path / "store"))
    # The stored log-probs come from another call of the op (other tiles, other summation order): each span
    # token's log-prob (|log p| < 8 at V = 128) may differ by a few fp32 ulps (4.8e-7 each), and a reward is
    # beta = 0.5 times a sum over a row's few (<= 4) span tokens of such differences: 2e-6 absolute.
    for a, b in zip(live, stored):
        for name in ("loss", *OUR_METRICS, *TRL_METRICS):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=2e-6), name


def test_a_soft_capped_model_is_served_with_its_cap():
    model = tiny_model("paligemma2")
    assert model.config.get_text_config().final_logit_softcapping == 3.0
    assert loss_takes_softcap()  # the loss reproduces the cap, so the model is not refused
    assert get_adapter(model).logit_softcap(model) == 3.0
    batch = batch_for("paligemma2", 0)
    with pytest.raises(ValueError, match="softcap"):
        compute_firempo_loss(model, tiny_model("paligemma2", seed=1), batch, FiReMPOLoss(softcap=5.0))
    other = tiny_model("paligemma2", seed=1)
    other.config.text_config.final_logit_softcapping = 5.0
    with pytest.raises(ValueError, match="reference model's final_logit_softcapping=5.0"):
        compute_firempo_loss(model, other, batch, FiReMPOLoss())
