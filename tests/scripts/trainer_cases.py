"""Shared set-up of the trainer tests: tiny models, synthetic data, run options, and the plain
single-process training loop (no DeepSpeed) that the distributed runs are held against.

Imported by the pytest modules and by the distributed scripts launched with torchrun.
"""

from __future__ import annotations

import torch

from firempo_kernels.integrations.batch import PreferenceCollator
from firempo_kernels.integrations.smoke import synthetic_examples, tiny_model
from firempo_kernels.integrations.trainer import FiReMPOModule, TrainerConfig, cosine_schedule, load_deepspeed_config
from firempo_kernels.losses import FiReMPOLoss

FAMILY = "qwen2_vl"
NUM_EXAMPLES = 12  # 3 optimizer steps of 2 ranks x 1 example x 2 accumulation steps
GLOBAL_BATCH = 4
# 100x the paper's rate: the weights move by ~1e-3 relative in 3 steps, 100x the tolerance of the
# comparisons, while Adam's normalised steps keep gradient rounding (which differs with the reduction
# order across ranks) far below it.
LEARNING_RATE = 1e-4


def make_policy(seed: int, frozen_head: bool = False) -> torch.nn.Module:
    policy = tiny_model(FAMILY, seed=seed).train()
    if frozen_head:
        policy.get_output_embeddings().weight.requires_grad_(False)
    # A key bias adds q.R(b_k) to the scores of a query, the same for every key up to the rotary angle, and
    # the softmax cancels what is the same: its gradient nearly cancels, some entries sit at the level of
    # fp32 rounding (which changes with the order of the sums across ranks), and Adam's normalised step
    # turns that noise into learning-rate-sized moves. Freeze it so the weights compared are well defined.
    # The vision tower and projector are frozen too, as in the paper (and firempo-train's default): their
    # LayerNorm biases have gradients that nearly cancel in the same way.
    for name, p in policy.named_parameters():
        if name.endswith("k_proj.bias") or name.startswith("model.visual."):
            p.requires_grad_(False)
    return policy


def make_reference(seed: int) -> torch.nn.Module:
    return tiny_model(FAMILY, seed=seed + 1)


def make_loss() -> FiReMPOLoss:
    # Every term active and none dominant, so an error in any of them shows.
    return FiReMPOLoss(beta=0.5, alpha=0.2, gamma=0.5, lambda_=0.3)


def make_data(seed: int):
    config = tiny_model(FAMILY).config
    return synthetic_examples(config, NUM_EXAMPLES, seed=seed + 2, corrupted_every=2)


def collator() -> PreferenceCollator:
    return PreferenceCollator(0)


def trainer_config(output_dir: str, seed: int, **overrides) -> TrainerConfig:
    values = dict(
        output_dir=output_dir, learning_rate=LEARNING_RATE, weight_decay=0.01, micro_batch_size=1,
        gradient_accumulation_steps=2, max_grad_norm=1.0, seed=seed, shuffle=True, warmup_ratio=0.0,
        gradient_checkpointing=True, progress_bar=False, tensorboard=False, save_final_model=False,
    )
    values.update(overrides)
    return TrainerConfig(**values)


def deepspeed_config() -> dict:
    config = load_deepspeed_config("zero3")
    # Partition every parameter, however small, so that the tiny lm_head is partitioned as a real one is.
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def plain_run(seed: int, frozen_head: bool, batch_size: int = GLOBAL_BATCH, accumulation: int = 1):
    """Single process, no DeepSpeed: torch AdamW on the whole global batch per step (optionally as
    ``accumulation`` micro-batches with ``num_examples_in_batch``). Returns (losses, final policy state)."""
    cfg = trainer_config("unused", seed)
    policy, reference = make_policy(seed, frozen_head), make_reference(seed)
    module = FiReMPOModule(policy, make_loss(), reference).train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    data = make_data(seed)
    steps = len(data) // (batch_size * accumulation)
    sched = cosine_schedule(opt, steps)
    sampler = torch.utils.data.distributed.DistributedSampler(
        data, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed, drop_last=True
    )
    order = list(sampler)
    collate = collator()
    losses = {}
    for step in range(steps):
        window = order[step * batch_size * accumulation:(step + 1) * batch_size * accumulation]
        total = 0.0
        for m in range(accumulation):
            batch = collate([data[i] for i in window[m * batch_size:(m + 1) * batch_size]])
            out = module(batch, num_examples_in_batch=batch_size * accumulation)
            out.loss.backward()
            total += out.loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step + 1] = total
    return losses, {k: v.detach().clone() for k, v in policy.state_dict().items()}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom else diff


