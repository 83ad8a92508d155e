"""FiReMPOTrainer on TRL's DPOTrainer, one process: the DPO preset equals TRL's own sigmoid DPO; with each
reference (frozen model, LoRA adapters disabled, a precomputed store) and each preset, one step logs the loss and
rewards of the full-logits float64 computation and moves the weights by exactly its gradient, the reward margin
changing as that gradient predicts (tests/trainer_checks.py); every metric is logged, each registered
vision-language family trains with images and corrupted images, and a store of another run is refused and kept
(the ZeRO-3 runs are in test_trainer_distributed.py)."""

import os

import pytest
import torch
from datasets import Dataset
from PIL import Image

from firempo_kernels.integrations.smoke import tiny_model, tiny_processor
from firempo_kernels.integrations.trl import FiReMPOConfig, FiReMPOTrainer
from trainer_checks import assert_close, float64_copy, full_logits, full_logits_loss, trainable

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

pytestmark = pytest.mark.usefixtures("one_thread")
os.environ.setdefault("TQDM_DISABLE", "1")

OUR_METRICS = ("kl/forward", "kl/reverse", "loss/rank", "loss/visual", "loss/kl", "visual/margins", "span_tokens")
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def config(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                gradient_checkpointing=False, seed=0, beta=0.5, max_length=None)
    return {**base, **kwargs}


def image(seed, size=16):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


TEXT_ROWS = [
    dict(prompt="where is the lesion", chosen=" the lesion is in the <mask>left</mask> lung",
         rejected=" the lesion is in the <mask>right</mask> lung"),
    dict(prompt="is a mass present", chosen=" <mask>yes</mask> a small mass", rejected=" <mask>no</mask> mass"),
    dict(prompt="what is in the heart", chosen=" a <mask>large</mask> mass", rejected=" a <mask>small</mask> mass"),
    dict(prompt="is the lesion large", chosen=" <mask>no</mask> the lesion is small",
         rejected=" <mask>yes</mask> the lesion is large"),
]


def vision_dataset(n=4, every_corrupted=2, tagged=True):
    rows = []
    for i in range(n):
        text = TEXT_ROWS[i % len(TEXT_ROWS)]
        row = dict(text if tagged else untagged([text])[0], id=f"ex{i}", images=[image(i)])
        row["corrupted_images"] = [image(100 + i)] if i % every_corrupted == 0 else []
        rows.append(row)
    return Dataset.from_list(rows)


def untagged(rows):
    return [{k: v.replace("<mask>", "").replace("</mask>", "") for k, v in row.items()} for row in rows]


def step_rows(history):
    return [row for row in history if "loss" in row and "train_loss" not in row]


def test_dpo_preset_equals_trls_sigmoid_dpo(tmp_path):
    """Same tiny model, data and seed: per-step loss and rewards/* of our DPO preset = TRL's own, over 4 steps."""
    tok = tiny_processor("llama")
    data = Dataset.from_list(untagged(TEXT_ROWS) * 2)

    def run(trainer_cls, config_cls, **extra):
        args = config_cls(**config(tmp_path, max_steps=4, **extra))
        trainer = trainer_cls(tiny_model("llama", seed=1), ref_model=tiny_model("llama", seed=2), args=args,
                              train_dataset=data, processing_class=tok)
        trainer.train()
        return step_rows(trainer.state.log_history)

    theirs = run(trl.DPOTrainer, trl.DPOConfig, loss_type=["sigmoid"])
    ours = run(FiReMPOTrainer, FiReMPOConfig, preset="dpo")
    assert len(theirs) == len(ours) == 4
    # Rewards are beta x (sum of ~10 log-probs of ~-2 minus the reference's): each side's fp32 sums round at ~1e-6
    # absolute, TRL's as much as ours, so everything is held to 1e-5 relative or 1e-5 absolute near zero.
    for mine, reference in zip(ours, theirs):
        for name in ("loss", *TRL_METRICS):
            assert mine[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-5), name


@pytest.mark.parametrize("mode", ["lora", "model"])
def test_firempo_trains_and_logs_every_metric(tmp_path, mode):
    family = "qwen2_5_vl"
    extra = {}
    if mode == "lora":
        extra["peft_config"] = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    else:
        extra["ref_model"] = tiny_model(family, seed=3)
    trainer = FiReMPOTrainer(tiny_model(family, seed=1), args=FiReMPOConfig(**config(tmp_path)),
                             train_dataset=vision_dataset(), processing_class=tiny_processor(family), **extra)
    assert trainer.reference.mode == ("adapters_disabled" if mode == "lora" else "model")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    rows = step_rows(trainer.state.log_history)
    assert len(rows) == 2
    for row in rows:
        missing = [m for m in (*OUR_METRICS, *TRL_METRICS) if m not in row]
        assert not missing, missing
        assert all(torch.isfinite(torch.tensor(row[m])) for m in (*OUR_METRICS, *TRL_METRICS))
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
    if mode == "lora":
        assert all("lora_" in n for n in moved)


def test_precomputed_reference_equals_live(tmp_path):
    """The store is built before training (TRL's precompute hook) and then replaces the reference forward."""
    family = "qwen2_5_vl"
    processor = tiny_processor(family)

    def run(**extra):
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
        trainer = FiReMPOTrainer(tiny_model(family, seed=1), args=FiReMPOConfig(**config(tmp_path, **extra)),
                                 train_dataset=vision_dataset(), processing_class=processor, peft_config=lora)
        trainer.train()
        return trainer, step_rows(trainer.state.log_history)

    _, live = run()
    trainer, stored = run(reference_mode="precomputed", precomputed_reference_dir=str(tmp_path / "store"))
    assert trainer.reference.mode == "precomputed" and (tmp_path / "store" / "index.json").is_file()
    for a, b in zip(live, stored):
        for name in ("loss", *OUR_METRICS, *TRL_METRICS):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_each_vision_family_trains_with_corrupted_images(tmp_path, family):
    trainer = FiReMPOTrainer(tiny_model(family, seed=1), args=FiReMPOConfig(**config(tmp_path)),
                             train_dataset=vision_dataset(), processing_class=tiny_processor(family))
    trainer.train()
    rows = step_rows(trainer.state.log_history)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all("visual/margins" in r and r["span_tokens"] > 0 for r in rows)


def test_config_fields_are_checked():
    def make(**kwargs):
        return FiReMPOConfig(output_dir="x", use_cpu=True, bf16=False, report_to="none", **kwargs)

    with pytest.raises(ValueError, match="`preset` must be one of"):
        make(preset="ppo")
    with pytest.raises(ValueError, match="FiReMPOConfig: `lambda_` must lie in"):
        make(lambda_=2.0)
    with pytest.raises(ValueError, match="`reference_mode` must be one of"):
        make(reference_mode="frozen")
    with pytest.raises(ValueError, match="`loss_type` must be"):
        make(loss_type=["ipo"])
    with pytest.raises(ValueError, match="contradicts reference_mode='model'"):
        make(reference_mode="model", precompute_ref_log_probs=True)
    with pytest.raises(TypeError, match="`shared_prefix` must be a bool"):
        make(shared_prefix="no")
    assert make().shared_prefix is True
    rrpo = make(preset="rrpo")
    assert (rrpo.alpha, rrpo.gamma, rrpo.lambda_) == (0.01, 0.0, 1.0)
    assert make(preset="rrpo", gamma=0.3).gamma == 0.3
    assert make(precompute_ref_log_probs=True).reference_mode == "precomputed"


def test_untagged_rows_are_refused_outside_the_dpo_preset(tmp_path):
    with pytest.raises(ValueError, match=r"2 bad row\(s\) in train_dataset[\s\S]*preset='dpo'"):
        FiReMPOTrainer(tiny_model("llama", seed=1), ref_model=tiny_model("llama", seed=2),
                       args=FiReMPOConfig(**config(tmp_path)), processing_class=tiny_processor("llama"),
                       train_dataset=Dataset.from_list(TEXT_ROWS[:2] + untagged(TEXT_ROWS[2:])))


def test_a_store_of_another_run_is_refused_and_kept(tmp_path):
    """A store built for one model, then a run with another model (or other data) pointed at it: refused with
    the mismatch named, the store byte for byte as it was; ``overwrite_precomputed_reference`` rebuilds it."""
    tok, store = tiny_processor("llama"), tmp_path / "store"
    data = Dataset.from_list(TEXT_ROWS)
    args = config(tmp_path, reference_mode="precomputed", precomputed_reference_dir=str(store))

    def trainer(seed, rows=data, **extra):
        return FiReMPOTrainer(tiny_model("llama", seed=seed), args=FiReMPOConfig(**{**args, **extra}),
                              train_dataset=rows, processing_class=tok)

    trainer(1, alpha=0.0)  # no token KL: the store keeps no hidden states
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    trainer(1, alpha=0.0)  # the same run again: the store serves it as it is
    with pytest.raises(ValueError, match=r"does not serve this run: built from another reference model: output head "
                                         r"weights \(\w+ when built, \w+ now\)"):
        trainer(2, alpha=0.0)  # another model of the same architecture
    with pytest.raises(ValueError, match=r"settings \(the loss has alpha > 0"):
        trainer(1)
    with pytest.raises(ValueError, match=r"data \(1 of 5 example\(s\) are not in it"):
        trainer(1, alpha=0.0, rows=Dataset.from_list(TEXT_ROWS + [dict(TEXT_ROWS[0], prompt="is it new")]))
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    trainer(2, overwrite_precomputed_reference=True)
    assert {p.name: p.read_bytes() for p in store.iterdir()} != before
    trainer(2)  # the rebuilt store serves the second model (and keeps hidden states for its token KL)


# One step on a fixed batch of four rows (two with a v'), plain SGD without clipping: the update is minus the
# learning rate times the loss's gradient, held to the gradient of the full-logits float64 loss. lambda = 0.3
# (not 0.5) so that the two KL directions weigh differently; alpha and gamma large enough that their terms
# move the step well beyond rounding.
STEP_HP = {
    "firempo": dict(beta=0.5, alpha=0.5, gamma=0.5, lambda_=0.3),
    "rrpo": dict(beta=0.5, alpha=0.5),  # gamma 0, lambda 1: the forward KL alone
    "mask_dpo": dict(beta=0.5),  # gamma 0, alpha 0
    "dpo": dict(beta=0.5),  # as mask_dpo, every response token weighted
}
STEP_LR = 1e-3


def sharp(model, factor=8.0):
    """``model`` with its output head scaled: a tiny random model's next-token distributions are near uniform,
    where KL(p||q) and KL(q||p) agree to third order; sharper ones tell the two directions apart."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


@pytest.mark.parametrize("reference, preset", [
    ("model", "firempo"), ("adapters_disabled", "firempo"), ("precomputed", "firempo"),
    ("model", "rrpo"), ("model", "mask_dpo"), ("model", "dpo"),
])
def test_one_step_against_the_full_logits_loss(tmp_path, reference, preset):
    family = "llava"
    rows = vision_dataset(4, tagged=preset != "dpo")
    extra = {}
    if reference == "model":
        extra["ref_model"] = sharp(tiny_model(family, seed=2))
    else:
        extra["peft_config"] = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                               init_lora_weights=False)
    args = FiReMPOConfig(**config(
        tmp_path, per_device_train_batch_size=4, max_steps=1, optim="sgd", learning_rate=STEP_LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, preset=preset, **STEP_HP[preset],
        reference_mode="precomputed" if reference == "precomputed" else "auto",
        precomputed_reference_dir=str(tmp_path / "store")))
    hp = {name: getattr(args, name) for name in ("beta", "alpha", "gamma", "lambda_")}  # the preset's filled in
    trainer = FiReMPOTrainer(sharp(tiny_model(family, seed=1)), args=args, train_dataset=rows,
                             processing_class=tiny_processor(family), **extra)
    assert trainer.reference.mode == reference
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])["batch"]
    tok = trainer.processing_class.tokenizer
    for i, row in enumerate(rows):  # the rows the independent loss reads: y+ of each example first, then y-
        for offset, side in ((0, "chosen"), (len(rows), "rejected")):
            labels, text = batch.labels[offset + i], row[side].replace("<mask>", "").replace("</mask>", "")
            expected = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
            assert tok.decode(labels[labels != -100]) == tok.decode(expected), (i, side)

    def independent(model):
        policy = float64_copy(model)
        if reference == "model":
            ref = float64_copy(trainer.ref_model)
        else:  # the policy with its adapters off (the precomputed store was built from it)
            def ref(images):
                with policy.disable_adapter():
                    return full_logits(policy, batch, images)
        return (policy, *full_logits_loss(policy, ref, batch, **hp, corrupted=True))

    policy64, loss64, margin64, expected = independent(trainer.model)
    params64 = trainable(policy64)
    def gradient(value, **kwargs):  # zero for a parameter the loss does not reach (a vision layer left unused)
        found = torch.autograd.grad(value, list(params64.values()), allow_unused=True, **kwargs)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params64.values(), found)]

    grads = dict(zip(params64, gradient(loss64, retain_graph=True)))
    margin_grads = gradient(margin64)
    predicted = -STEP_LR * sum((g * gm).sum() for g, gm in zip(grads.values(), margin_grads)).item()
    before = {n: p.detach().clone() for n, p in trainable(trainer.model).items()}
    assert before.keys() == grads.keys() and len(grads) > 0

    trainer.train()
    (row,) = step_rows(trainer.state.log_history)
    # The fused path works in fp32 on ~10 span tokens of log-probs ~ -5 per row: a few 1e-6 absolute.
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "loss/rank", "loss/visual",
                 "loss/kl"):
        assert_close(row[name], expected[name], rtol=1e-5, atol=1e-5, what=f"{reference}/{preset}: logged {name}")
    scale = max(g.abs().max().item() for g in grads.values())
    for name, p in trainable(trainer.model).items():
        step = (p.detach().double() - before[name].double()) / -STEP_LR
        # The new weight is rounded to fp32: |w| * 2^-24 over the learning rate; the fp32 backward rounds at
        # ~1e-6 of the terms it sums, whose size is that of the largest gradients, not of an entry that cancels
        # to ~0 (a key bias, to which softmax is blind).
        atol = before[name].abs().max().item() * 2.0**-23 / STEP_LR + 1e-5 * scale
        assert_close(step, grads[name], rtol=1e-4, atol=atol, what=f"{reference}/{preset}: step of {name} / -lr")
    *_, after = independent(trainer.model)
    change = (after["rewards/margins"] - expected["rewards/margins"]).item()
    # First order in the step: the change is the gradients' inner product, its sign that of the prediction.
    assert change * predicted > 0 and abs(change - predicted) <= 0.2 * abs(predicted), (change, predicted)
    if hp["alpha"] == 0 and hp["gamma"] == 0:
        assert change > 0  # the rank term alone can only push the margin up
