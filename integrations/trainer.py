"""FiRe-MPO training of Hugging Face models under DeepSpeed (ZeRO-3 included).

Three layers, each usable on its own:

- :func:`compute_firempo_loss` -- the thin adapter for custom loops and ``transformers.Trainer``: model,
  reference (a frozen model, the policy with its peft adapters disabled, or a precomputed reference) and a
  collated :class:`~firempo_kernels.integrations.batch.PreferenceBatch` in, ``FiReMPOOutput`` out. Two
  policy calls per batch (clean pair, corrupted pair), two reference calls under ``no_grad``, one loss.
- :class:`FiReMPOModule` -- the ``nn.Module`` DeepSpeed wraps. The head weight is read and the loss run
  inside its ``forward``: under ZeRO-3 that access is what gathers the partitioned ``lm_head.weight`` whole
  and routes its gradient back into the reduce-scatter.
- :class:`FiReMPOTrainer` -- the loop on ``deepspeed.initialize``: gradient accumulation, cosine schedule,
  rank-0 progress bar, JSONL (and TensorBoard) metrics, checkpoints with exact resume, a guard against
  non-finite losses, and the final save in Hugging Face format (or the LoRA adapter alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from firempo_kernels.losses import FiReMPOLoss, FiReMPOOutput
from firempo_kernels.precomputed_reference import PrecomputedReference

from .batch import PreferenceBatch
from .models import ModelAdapter, get_adapter, unwrap_model

__all__ = [
    "ADAPTERS_DISABLED",
    "compute_firempo_loss",
    "block_hidden_states",
    "block_targets",
    "FiReMPOModule",
    "TrainerConfig",
    "FiReMPOTrainer",
    "TrainResult",
    "NonFiniteLossError",
    "ReferenceStore",
    "cosine_schedule",
    "build_deepspeed_config",
    "load_deepspeed_config",
    "init_distributed",
    "is_peft_model",
]

ADAPTERS_DISABLED: Literal["adapters_disabled"] = "adapters_disabled"
"""``reference`` value meaning: the reference is the policy itself with its peft adapters disabled."""

ReferenceArg = nn.Module | PrecomputedReference | Literal["adapters_disabled"]


class NonFiniteLossError(FloatingPointError):
    """A micro-batch gave a non-finite loss; nothing was back-propagated and no optimizer step was taken."""


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (has adapters that can be switched off)."""
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for a reference pass through a module that is otherwise training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _repeat_for_both_responses(images: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vision inputs of B examples -> those of the 2B rows (chosen rows, then rejected rows)."""
    return {key: torch.cat((value, value)) for key, value in images.items()}


def block_hidden_states(
    adapter: ModelAdapter, model: nn.Module, batch: PreferenceBatch, corrupted: bool
) -> torch.Tensor:
    """[k * B, T - 1, d]: hidden states of the blocks (v, y+), (v, y-) and, if ``corrupted``, (v', y+),
    (v', y-), each position predicting the next token. One model call per image kind."""
    passes = [batch.images] + ([batch.corrupted_images] if corrupted else [])
    hidden = [
        adapter.hidden_states(model, batch.input_ids, batch.attention_mask, _repeat_for_both_responses(images))[:, :-1]
        for images in passes
    ]
    return hidden[0] if len(hidden) == 1 else torch.cat(hidden)


def block_targets(
    batch: PreferenceBatch, corrupted: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(labels, span_weights, has_corrupted_image)`` of the loss's blocks, aligned with
    :func:`block_hidden_states` (shifted: position t of the result is token t + 1 of the batch)."""
    blocks = 2 if corrupted else 1
    return (
        batch.labels[:, 1:].repeat(blocks, 1),
        batch.span_weights[:, 1:].repeat(blocks, 1),
        batch.has_corrupted_image if corrupted else None,
    )


def compute_firempo_loss(
    model: nn.Module,
    reference: ReferenceArg,
    batch: PreferenceBatch,
    loss_fn: FiReMPOLoss,
    *,
    reference_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    num_examples_in_batch: int | torch.Tensor | None = None,
    corrupted_pass: bool | None = None,
    adapter: ModelAdapter | None = None,
    reference_adapter: ModelAdapter | None = None,
) -> FiReMPOOutput:
    """The FiRe-MPO loss of one collated batch: the thin adapter for custom loops and ``transformers.Trainer``.

    Runs the policy on the 2B token rows with the clean images and, when the batch has corrupted images and
    the loss has a visual term (``gamma > 0``), once more with the corrupted images; the reference the same
    way under ``no_grad`` (unless precomputed); then the fused loss on the span tokens. No ``[rows, T, V]``
    logits are formed.

    Args:
        model: the policy, a Hugging Face model (optionally a ``peft.PeftModel``) with a registered adapter
            (see :mod:`firempo_kernels.integrations.models`).
        reference: a frozen reference model (same tokenizer/vocabulary); or :data:`ADAPTERS_DISABLED` to use
            ``model`` with its peft adapters switched off (the paper's LoRA setting); or the batch's
            :class:`PrecomputedReference` (collated in ``batch.example_ids`` order; no reference forward).
        batch: a :class:`PreferenceBatch` of B examples ([2B, T] rows); moved to the model's device if needed.
        loss_fn: the configured :class:`FiReMPOLoss`.
        reference_head: with a :class:`PrecomputedReference` only: ``(weight [V, d'], bias [V] or None)`` of
            the reference head, which the token KL applies to the stored hidden states. None means the
            reference head is the policy's own (a frozen head, as in LoRA training); a head that trains, or a
            reference that is another model, needs its own (``PrecomputedReferenceStore.head()``).
        num_examples_in_batch: passed to the loss: the number of examples of the whole accumulation window
            (an int or 0-dim tensor), so that summed micro-batch gradients equal the window mean's.
        corrupted_pass: whether to run the (v', .) pass (only ever with ``gamma > 0``). Default: when the batch
            has corrupted images. Under ZeRO-3 every rank must make the same model calls, so a distributed loop
            decides this for all ranks together; ``True`` with a batch without v' runs the clean images there
            with c = 0.
        adapter, reference_adapter: override the adapter lookup (default: :func:`get_adapter`).

    Returns:
        ``FiReMPOOutput``: scalar float32 ``loss`` with a graph to the trainable parameters, detached metrics.
    """
    fn = "compute_firempo_loss"
    if not isinstance(batch, PreferenceBatch):
        raise TypeError(f"{fn}: `batch` must be a PreferenceBatch; got {type(batch).__name__}")
    if not isinstance(loss_fn, FiReMPOLoss):
        raise TypeError(f"{fn}: `loss_fn` must be a FiReMPOLoss; got {type(loss_fn).__name__}")
    if reference_head is not None and not isinstance(reference, PrecomputedReference):
        raise ValueError(f"{fn}: `reference_head` goes with a PrecomputedReference only; a live reference has its own")
    adapter = adapter or get_adapter(model)
    weight, bias = adapter.head(model)
    if batch.input_ids.device != weight.device:
        batch = batch.to(weight.device, non_blocking=True)
    if corrupted_pass is None:
        corrupted_pass = batch.corrupted_images is not None
    corrupted = corrupted_pass and loss_fn.gamma > 0
    if corrupted and batch.corrupted_images is None:
        batch = dataclasses.replace(
            batch, corrupted_images=batch.images,
            has_corrupted_image=torch.zeros(batch.num_examples, dtype=torch.bool, device=batch.input_ids.device),
        )
    hidden = block_hidden_states(adapter, model, batch, corrupted)
    labels, span_weights, has_corrupted = block_targets(batch, corrupted)

    ref_weight, ref_bias = None, None
    if isinstance(reference, PrecomputedReference):
        ref: torch.Tensor | PrecomputedReference = reference.to(weight.device, non_blocking=True)
        if corrupted and ref.num_blocks == 2:
            # No example of this batch has v' (c = 0 everywhere): its (v', .) rows hold no span token.
            ref = ref._replace(row_counts=torch.cat((ref.row_counts, torch.zeros_like(ref.row_counts))))
        if reference_head is not None:
            ref_weight, ref_bias = reference_head
        if ref.hidden is not None and ref.hidden.dtype != weight.dtype:
            ref = ref._replace(hidden=ref.hidden.to(weight.dtype))
    elif isinstance(reference, str) and reference == ADAPTERS_DISABLED:
        if not is_peft_model(model):
            raise TypeError(
                f"{fn}: reference={ADAPTERS_DISABLED!r} needs a peft model whose adapters can be disabled; got "
                f"{type(model).__name__}. Pass a separate reference model or a PrecomputedReference instead."
            )
        with torch.no_grad(), _eval_mode(model), model.disable_adapter():
            ref = block_hidden_states(adapter, model, batch, corrupted)
            ref_weight, ref_bias = adapter.head(model)
    elif isinstance(reference, nn.Module):
        reference_adapter = reference_adapter or get_adapter(reference)
        with torch.no_grad(), _eval_mode(reference):
            ref = block_hidden_states(reference_adapter, reference, batch, corrupted)
            ref_weight, ref_bias = reference_adapter.head(reference)
    else:
        raise TypeError(
            f"{fn}: `reference` must be an nn.Module, a PrecomputedReference or {ADAPTERS_DISABLED!r}; "
            f"got {type(reference).__name__}"
        )
    if ref_weight is weight:
        ref_weight, ref_bias = None, None  # the loss then shares the head (and its bias) explicitly
    return loss_fn(
        weight, hidden, ref, labels, span_weights, has_corrupted,
        ref_weight=ref_weight, bias=bias, ref_bias=ref_bias, num_examples_in_batch=num_examples_in_batch,
    )


class FiReMPOModule(nn.Module):
    """The module DeepSpeed wraps: policy, optional frozen reference, the loss; ``forward`` returns the loss.

    Args:
        policy: the Hugging Face model being trained (optionally a ``peft.PeftModel``).
        loss_fn: the configured :class:`FiReMPOLoss`.
        reference: a separate reference model (registered as a frozen submodule, so ZeRO-3 partitions it
            and runs it inference-only); :data:`ADAPTERS_DISABLED` (policy without its peft adapters); or
            ``"precomputed"`` (each ``forward`` receives the batch's :class:`PrecomputedReference`).
        reference_head: ``"precomputed"`` only: the reference head ``(weight, bias)`` when it is not the
            policy's (see :func:`compute_firempo_loss`); kept as non-persistent buffers, so every rank holds a
            whole copy and checkpoints do not carry it.
    """

    def __init__(
        self,
        policy: nn.Module,
        loss_fn: FiReMPOLoss,
        reference: nn.Module | str = ADAPTERS_DISABLED,
        *,
        reference_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(policy, nn.Module):
            raise TypeError(f"FiReMPOModule: `policy` must be an nn.Module; got {type(policy).__name__}")
        if not isinstance(loss_fn, FiReMPOLoss):
            raise TypeError(f"FiReMPOModule: `loss_fn` must be a FiReMPOLoss; got {type(loss_fn).__name__}")
        self.policy = policy
        self.loss_fn = loss_fn
        self.adapter = get_adapter(policy)
        self.reference_adapter: ModelAdapter | None = None
        if isinstance(reference, nn.Module):
            if reference is policy:
                raise ValueError(
                    "FiReMPOModule: `reference` is the policy object itself; pass a separate copy, or "
                    f"{ADAPTERS_DISABLED!r} for a peft policy"
                )
            reference.requires_grad_(False)
            reference.eval()
            self.reference = reference
            self.reference_adapter = get_adapter(reference)
            self.reference_mode = "model"
        elif reference == ADAPTERS_DISABLED:
            if not is_peft_model(policy):
                raise TypeError(
                    f"FiReMPOModule: reference={ADAPTERS_DISABLED!r} needs a peft policy; got {type(policy).__name__}"
                )
            self.reference_mode = ADAPTERS_DISABLED
        elif reference == "precomputed":
            self.reference_mode = "precomputed"
        else:
            raise ValueError(
                f"FiReMPOModule: `reference` must be an nn.Module, {ADAPTERS_DISABLED!r} or 'precomputed'; "
                f"got {reference!r}"
            )
        if reference_head is not None:
            if self.reference_mode != "precomputed":
                raise ValueError("FiReMPOModule: `reference_head` goes with reference='precomputed' only")
            weight, bias = reference_head
            self.register_buffer("reference_head_weight", weight.detach().clone(), persistent=False)
            self.register_buffer(
                "reference_head_bias", None if bias is None else bias.detach().clone(), persistent=False
            )
        self.has_reference_head = reference_head is not None

    def train(self, mode: bool = True) -> FiReMPOModule:
        super().train(mode)
        if self.reference_mode == "model":
            self.reference.eval()  # a frozen reference never trains, even when the engine calls .train()
        return self

    def forward(
        self,
        batch: PreferenceBatch,
        precomputed: PrecomputedReference | None = None,
        num_examples_in_batch: int | torch.Tensor | None = None,
        corrupted_pass: bool | None = None,
    ) -> FiReMPOOutput:
        """Loss of one micro-batch (see :func:`compute_firempo_loss`); ``precomputed`` only in that mode."""
        if self.reference_mode == "precomputed":
            if not isinstance(precomputed, PrecomputedReference):
                raise TypeError(
                    "FiReMPOModule.forward: this module was built with reference='precomputed', so "
                    f"`precomputed` must be the batch's PrecomputedReference; got {type(precomputed).__name__}"
                )
            reference: ReferenceArg = precomputed
            head = (self.reference_head_weight, self.reference_head_bias) if self.has_reference_head else None
        elif precomputed is not None:
            raise ValueError(
                f"FiReMPOModule.forward: got a `precomputed` reference but the module's reference is "
                f"{self.reference_mode!r}"
            )
        else:
            reference = self.reference if self.reference_mode == "model" else ADAPTERS_DISABLED
            head = None
        return compute_firempo_loss(
            self.policy, reference, batch, self.loss_fn, reference_head=head,
            num_examples_in_batch=num_examples_in_batch,
            corrupted_pass=corrupted_pass, adapter=self.adapter, reference_adapter=self.reference_adapter,
        )


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the peak at ``total_steps``."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            "cosine_schedule: need total_steps >= 1, 0 <= warmup_steps <= total_steps and min_lr_ratio in [0, 1]; "
            f"got {total_steps}, {warmup_steps}, {min_lr_ratio}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------
# Distributed setup and DeepSpeed configs
# ----------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start (or join) the process group through DeepSpeed; returns ``(rank, world_size)``.

    Under ``deepspeed``/``torchrun`` the launcher's environment is used. Run directly, a one-process group
    is set up on a free local port (DeepSpeed would otherwise try MPI discovery).
    """
    import deepspeed

    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")):
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


SHIPPED_DEEPSPEED_CONFIGS = ("zero3", "zero3_offload")


def load_deepspeed_config(spec: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config from a dict, a JSON path, or the name of a shipped one (``zero3``, ``zero3_offload``)."""
    if isinstance(spec, Mapping):
        return json.loads(json.dumps(spec))
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_deepspeed_config: `spec` must be a dict, a path or a name; got {type(spec).__name__}")
    name = str(spec)
    path = Path(name)
    if name in SHIPPED_DEEPSPEED_CONFIGS or name.removesuffix(".json") in SHIPPED_DEEPSPEED_CONFIGS and not path.exists():
        path = Path(__file__).parent / "configs" / f"{name.removesuffix('.json')}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"load_deepspeed_config: no DeepSpeed config at {name!r} (give a JSON path or one of "
            f"{SHIPPED_DEEPSPEED_CONFIGS})"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _resolve(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` to ``value`` where the config says "auto" or nothing; refuse a conflicting explicit value."""
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
        return
    same = current == value or (
        isinstance(current, (int, float)) and isinstance(value, (int, float)) and math.isclose(current, value)
    ) or (isinstance(current, list) and list(value) == current)
    if not same:
        raise ValueError(
            f"DeepSpeed config sets `{dotted}` = {current!r} but the run asks for {value!r}; set it to \"auto\" in "
            "the DeepSpeed JSON (the run config owns it) or make the two agree"
        )


def build_deepspeed_config(
    base: Mapping[str, Any], cfg: TrainerConfig, *, world_size: int, bf16: bool
) -> dict[str, Any]:
    """The DeepSpeed config of a run: ``base`` with its "auto" fields filled from ``cfg``."""
    config = load_deepspeed_config(base)
    _resolve(config, "train_micro_batch_size_per_gpu", cfg.micro_batch_size)
    _resolve(config, "gradient_accumulation_steps", cfg.gradient_accumulation_steps)
    _resolve(config, "train_batch_size", cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size)
    _resolve(config, "gradient_clipping", cfg.max_grad_norm)
    _resolve(config, "bf16.enabled", bf16)
    if "optimizer" in config:
        _resolve(config, "optimizer.params.lr", cfg.learning_rate)
        _resolve(config, "optimizer.params.weight_decay", cfg.weight_decay)
        _resolve(config, "optimizer.params.betas", list(cfg.adam_betas))
        _resolve(config, "optimizer.params.eps", cfg.adam_eps)
    if config.get("fp16", {}).get("enabled") is True:
        raise ValueError("FiRe-MPO training runs in bf16 (GPU) or fp32 (CPU); the DeepSpeed config enables fp16")
    if "scheduler" in config:
        raise ValueError(
            "the DeepSpeed config defines a `scheduler`; the trainer builds its own cosine schedule from the run "
            "config (learning_rate, warmup_ratio, min_lr_ratio): remove it"
        )
    config.setdefault("steps_per_print", 10**9)  # the trainer reports progress itself
    config.setdefault("wall_clock_breakdown", False)
    return config


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------

@dataclass
class TrainerConfig:
    """Run options of :class:`FiReMPOTrainer` (the ``training`` section of a run config).

    Defaults follow the paper: learning rate 1e-6, one epoch, cosine schedule.
    """

    output_dir: str = "runs/firempo"
    epochs: int = 1
    max_steps: int | None = None  #: stop after this many optimizer steps (default: the epochs)
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 1  #: examples per rank per micro-batch
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  #: 0 turns clipping off
    seed: int = 42
    shuffle: bool = True
    precision: Literal["auto", "bf16", "fp32"] = "auto"  #: auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    save_steps: int | None = None  #: checkpoint every n steps (and always at the end)
    save_total_limit: int | None = None  #: keep only the newest n checkpoints
    resume_from: str | None = None  #: "latest", or a checkpoint directory (output_dir/checkpoints/step-N)
    logging_steps: int = 1
    tensorboard: bool | Literal["auto"] = "auto"  #: auto: on if tensorboard is installed
    progress_bar: bool = True
    num_workers: int = 0
    save_final_model: bool = True

    def __post_init__(self) -> None:
        positive = ("epochs", "micro_batch_size", "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainerConfig: `{name}` must be an int >= 1; got {value!r}")
        for name in ("max_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainerConfig: `{name}` must be None or an int >= 1; got {value!r}")
        for name in ("learning_rate", "weight_decay", "adam_eps", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"TrainerConfig: `{name}` must be a finite float >= 0; got {value!r}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"TrainerConfig: `{name}` must lie in [0, 1]; got {value!r}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # YAML gives a list
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"TrainerConfig: `adam_betas` must be two floats in [0, 1); got {self.adam_betas!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainerConfig: `precision` must be 'auto', 'bf16' or 'fp32'; got {self.precision!r}")
        if self.tensorboard not in (True, False, "auto"):
            raise ValueError(f"TrainerConfig: `tensorboard` must be true, false or 'auto'; got {self.tensorboard!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainerConfig:
        """From a mapping (e.g. a YAML section); unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainerConfig: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def bf16(self) -> bool:
        """Whether this run computes in bf16."""
        if self.precision == "auto":
            return torch.cuda.is_available()
        return self.precision == "bf16"


class ReferenceStore(Protocol):
    """Anything that returns the collated precomputed reference of a list of example ids."""

    def lookup(self, example_ids: Sequence[str]) -> PrecomputedReference: ...


@dataclass
class TrainResult:
    """What :meth:`FiReMPOTrainer.train` returns (rank 0 and others alike)."""

    global_step: int
    losses: dict[int, float] = field(default_factory=dict)  #: optimizer step -> mean loss of its window
    history: list[dict[str, float]] = field(default_factory=list)  #: the logged metric rows


class _SkippingSampler(torch.utils.data.Sampler):
    """A sampler that drops its first ``skip`` indices (resuming mid-epoch without loading the skipped data)."""

    def __init__(self, sampler: torch.utils.data.Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        for n, index in enumerate(self.sampler):
            if n >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


_CHECKPOINT_PREFIX = "step-"


class FiReMPOTrainer:
    """FiRe-MPO training on ``deepspeed.initialize``.

    Args:
        module: the :class:`FiReMPOModule` (policy, reference, loss).
        train_dataset: a map-style ``Dataset`` of :class:`~firempo_kernels.integrations.batch.PreferenceExample`.
        collate_fn: turns a list of examples into a :class:`PreferenceBatch` (e.g. ``PreferenceCollator``).
        config: the run options.
        deepspeed_config: a DeepSpeed config (dict, JSON path, or ``"zero3"``/``"zero3_offload"``); its "auto"
            fields are filled from ``config``.
        reference_store: the precomputed reference (required when the module's reference is ``"precomputed"``).
        log: where rank-0 messages go (default: stderr).

    Per optimizer step, every rank takes ``gradient_accumulation_steps`` micro-batches of
    ``micro_batch_size`` examples (incomplete batches at the end of an epoch are dropped so every step has
    the same global batch); the logged loss is the mean over the window's examples on all ranks.
    """

    def __init__(
        self,
        module: FiReMPOModule,
        train_dataset: torch.utils.data.Dataset,
        collate_fn,
        config: TrainerConfig,
        deepspeed_config: str | Mapping[str, Any] = "zero3",
        *,
        reference_store: ReferenceStore | None = None,
        log=None,
    ) -> None:
        if not isinstance(module, FiReMPOModule):
            raise TypeError(f"FiReMPOTrainer: `module` must be a FiReMPOModule; got {type(module).__name__}")
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"FiReMPOTrainer: `config` must be a TrainerConfig; got {type(config).__name__}")
        if module.reference_mode == "precomputed" and reference_store is None:
            raise ValueError("FiReMPOTrainer: the module's reference is 'precomputed' but no `reference_store` was given")
        self.module, self.dataset, self.collate_fn, self.config = module, train_dataset, collate_fn, config
        self.reference_store = reference_store
        self._log_stream = log or sys.stderr
        self.rank, self.world_size = init_distributed()
        self.bf16 = config.bf16()
        self.ds_config = build_deepspeed_config(
            load_deepspeed_config(deepspeed_config), config, world_size=self.world_size, bf16=self.bf16
        )
        self.device = self._device()

        sampler = torch.utils.data.distributed.DistributedSampler(
            train_dataset, num_replicas=self.world_size, rank=self.rank, shuffle=config.shuffle,
            seed=config.seed, drop_last=True,
        )
        self.sampler = sampler
        self.micro_batches_per_epoch = len(sampler) // config.micro_batch_size
        self.steps_per_epoch = self.micro_batches_per_epoch // config.gradient_accumulation_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"FiReMPOTrainer: {len(train_dataset)} examples give no full step of micro_batch_size="
                f"{config.micro_batch_size} x gradient_accumulation_steps={config.gradient_accumulation_steps} x "
                f"{self.world_size} rank(s)"
            )
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

        import deepspeed

        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("FiReMPOTrainer: the policy has no trainable parameter")
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(module.policy)
        warmup = int(round(config.warmup_ratio * self.total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=trainable,
            config=self.ds_config,
            lr_scheduler=lambda opt: cosine_schedule(opt, self.total_steps, warmup, config.min_lr_ratio),
        )
        self.global_step = 0
        self._epoch, self._step_in_epoch = 0, 0
        self._history: list[dict[str, float]] = []
        self._losses: dict[int, float] = {}
        self._tb = None
        if config.resume_from:
            self._resume(config.resume_from)

    # -- small helpers ------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device(name)

    def log(self, message: str) -> None:
        """Print ``message`` on rank 0."""
        if self.rank == 0:
            print(f"[firempo] {message}", file=self._log_stream, flush=True)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _loader(self, epoch: int, skip_micro_batches: int) -> torch.utils.data.DataLoader:
        self.sampler.set_epoch(epoch)
        sampler = _SkippingSampler(self.sampler, skip_micro_batches * self.config.micro_batch_size)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.config.micro_batch_size, sampler=sampler, drop_last=True,
            collate_fn=self.collate_fn, num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    # -- one optimizer step -------------------------------------------------------------------------

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
        return tensor

    def _check_finite(self, loss: torch.Tensor, batch: PreferenceBatch, micro: int) -> None:
        """Stop every rank together, before any backward, when a rank's loss is NaN or infinite."""
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        if self._all_reduce(bad, torch.distributed.ReduceOp.MAX).item() == 0:
            return
        mine = list(batch.example_ids) if not torch.isfinite(loss.detach()) else []
        everyone: list[Any] = [mine]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            torch.distributed.all_gather_object(everyone, mine)
        culprits = [(r, ids) for r, ids in enumerate(everyone) if ids]
        where = "; ".join(f"rank {r}: examples {ids}" for r, ids in culprits)
        raise NonFiniteLossError(
            f"non-finite FiRe-MPO loss at optimizer step {self.global_step + 1} (epoch {self._epoch}, micro-batch "
            f"{micro} of the accumulation window) on {where}. Nothing was back-propagated for it and no optimizer "
            f"step was taken: the weights are those after step {self.global_step}"
            + (f" (checkpoint {self.checkpoint_dir})" if self.checkpoint_dir.exists() else "")
            + ". Check these examples (span weights, images) and the learning rate."
        )

    def _train_step(self, micro_batches: list[PreferenceBatch]) -> dict[str, float]:
        # DeepSpeed divides each micro-batch loss by the accumulation steps and averages the ranks; dividing
        # each micro-batch's summed example losses by (window examples / (steps * ranks)) then makes the step's
        # gradient that of the mean over every example of the window on every rank.
        # One collective for the window: its example count, and which micro-batches have a v' on any rank
        # (ZeRO-3 needs the same model calls on every rank, so the (v', .) pass runs everywhere or nowhere).
        flags = torch.tensor([float(sum(b.num_examples for b in micro_batches))]
                             + [float(b.corrupted_images is not None) for b in micro_batches], dtype=torch.float64)
        flags = self._all_reduce(flags).tolist()
        total, corrupted_pass = flags[0], [f > 0 for f in flags[1:]]
        scale = total / (len(micro_batches) * self.world_size)
        denominator = torch.tensor(scale, dtype=torch.float32, device=self.device)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, batch in enumerate(micro_batches):
            batch = batch.to(self.device, non_blocking=True)
            precomputed = None
            if self.module.reference_mode == "precomputed":
                precomputed = self.reference_store.lookup(batch.example_ids)
            out = self.engine(batch, precomputed, denominator, corrupted_pass[micro])
            self._check_finite(out.loss, batch, micro)
            self.engine.backward(out.loss)
            self.engine.step()
            loss_sum += out.loss.detach().to(torch.float64) * scale
            n = float(batch.num_examples)
            for name, value in out.metrics.items():
                value = value.detach().to(torch.float64)
                ok = torch.isfinite(value)
                weight = n if name != "span_tokens" else 1.0
                sums[name] = sums.get(name, 0.0) + torch.where(ok, value * weight, 0.0)
                counts[name] = counts.get(name, 0.0) + ok.to(torch.float64) * weight
        names = sorted(sums)
        packed = torch.stack([loss_sum] + [sums[k] for k in names] + [counts[k] for k in names])
        packed = self._all_reduce(packed).tolist()
        row = {"loss": packed[0] / total}
        for i, name in enumerate(names):
            s, c = packed[1 + i], packed[1 + len(names) + i]
            row[name] = s if name == "span_tokens" else (s / c if c else float("nan"))
        return row

    # -- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run to ``total_steps`` (from the resumed step, if any); save checkpoints and the final model."""
        cfg = self.config
        self.engine.train()
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._open_loggers()
        self.log(
            f"{self.total_steps} optimizer steps ({self.steps_per_epoch}/epoch) x {cfg.micro_batch_size} examples x "
            f"{cfg.gradient_accumulation_steps} accumulation x {self.world_size} rank(s); "
            f"{'bf16' if self.bf16 else 'fp32'}; reference: {self.module.reference_mode}"
        )
        bar = self._progress_bar()
        started = time.perf_counter()
        try:
            while self.global_step < self.total_steps:
                loader = iter(self._loader(self._epoch, self._step_in_epoch * cfg.gradient_accumulation_steps))
                while self._step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
                    window = [next(loader) for _ in range(cfg.gradient_accumulation_steps)]
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                    row = self._train_step(window)
                    self.global_step += 1
                    self._step_in_epoch += 1
                    self._losses[self.global_step] = row["loss"]
                    row = {"step": self.global_step, "epoch": self._epoch + self._step_in_epoch / self.steps_per_epoch,
                           "lr": lr, **row,
                           "elapsed_s": time.perf_counter() - started}
                    self._emit(row, bar)
                    if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step < self.total_steps:
                        self.save_checkpoint()
                if self._step_in_epoch >= self.steps_per_epoch:
                    self._epoch, self._step_in_epoch = self._epoch + 1, 0
            self.save_checkpoint()
            if cfg.save_final_model:
                self.save_model(self.output_dir / "final")
        finally:
            if bar is not None:
                bar.close()
            self._close_loggers()
        return TrainResult(self.global_step, dict(self._losses), list(self._history))

    # -- logging --------------------------------------------------------------------------------------

    def _progress_bar(self):
        if self.rank != 0 or not self.config.progress_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.global_step, desc="FiRe-MPO", unit="step",
                    file=self._log_stream, dynamic_ncols=True)

    def _open_loggers(self) -> None:
        self._jsonl = None
        if self.rank != 0:
            return
        path = self.output_dir / "metrics.jsonl"
        if self.global_step and path.exists():
            # Rows past the resumed step came from a run that stopped after its last checkpoint.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.global_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self._jsonl = open(path, "a", encoding="utf-8")
        want_tb = self.config.tensorboard
        if want_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if want_tb is True:
                    raise ImportError("training.tensorboard is true but the `tensorboard` package is not installed")
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.global_step + 1)

    def _close_loggers(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _emit(self, row: dict[str, float], bar) -> None:
        self._history.append(row)
        if self.rank != 0:
            return
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}")
        if row["step"] % self.config.logging_steps == 0 or row["step"] == self.total_steps:
            self._jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                          for k, v in row.items()}) + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for name, value in row.items():
                    if name != "step" and math.isfinite(value):
                        self._tb.add_scalar(name if "/" in name else f"train/{name}", value, row["step"])

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """DeepSpeed checkpoint of the current step (model, optimizer, scheduler, trainer position, RNG)."""
        tag = f"{_CHECKPOINT_PREFIX}{self.global_step}"
        state = {"global_step": self.global_step, "epoch": self._epoch, "step_in_epoch": self._step_in_epoch,
                 "trainer_config": asdict(self.config), "world_size": self.world_size}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=state)
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, self.checkpoint_dir / tag / f"rng_state_rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.rank == 0 and self.config.save_total_limit:
            tags = sorted((p for p in self.checkpoint_dir.glob(f"{_CHECKPOINT_PREFIX}*") if p.is_dir()),
                          key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX):]))
            for old in tags[: -self.config.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()
        self.log(f"checkpoint {self.checkpoint_dir / tag}")
        return self.checkpoint_dir / tag

    def _resume(self, where: str) -> None:
        if where == "latest":
            latest = self.checkpoint_dir / "latest"
            if not latest.is_file():
                self.log(f"resume_from=latest: no checkpoint under {self.checkpoint_dir}, starting fresh")
                return
            load_dir, tag = self.checkpoint_dir, latest.read_text().strip()
        else:
            path = Path(where)
            if not path.is_dir():
                raise FileNotFoundError(f"FiReMPOTrainer: resume_from={where!r} is not a checkpoint directory")
            load_dir, tag = path.parent, path.name
        loaded, state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if loaded is None:
            raise RuntimeError(f"FiReMPOTrainer: DeepSpeed could not load checkpoint {load_dir / tag}")
        if state.get("world_size") != self.world_size:
            raise ValueError(
                f"FiReMPOTrainer: checkpoint {load_dir / tag} was written by {state.get('world_size')} rank(s); this "
                f"run has {self.world_size}. ZeRO-3 optimizer partitions resume only on the same number of ranks."
            )
        self.global_step, self._epoch, self._step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        rng_path = load_dir / tag / f"rng_state_rank{self.rank}.pt"
        if rng_path.is_file():
            rng = torch.load(rng_path, weights_only=False)
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.log(f"resumed from {load_dir / tag} at step {self.global_step}")

    # -- final model ----------------------------------------------------------------------------------

    def consolidated_policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The policy's full state dict gathered on rank 0 (None on other ranks); collective: call on all ranks."""
        if self.engine.zero_optimization_partition_weights():
            full = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            full = self.engine.module.state_dict() if self.rank == 0 else None
        if full is None:
            return None
        prefix = "policy."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def save_model(self, directory: str | os.PathLike) -> Path:
        """Save the policy in Hugging Face format (``save_pretrained``), or only its adapter for a peft policy.
        Collective: call on all ranks; rank 0 writes."""
        directory = Path(directory)
        state = self.consolidated_policy_state_dict()
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            policy = self.module.policy
            if is_peft_model(policy):
                policy.save_pretrained(str(directory), state_dict=state)
            else:
                unwrap_model(policy).save_pretrained(str(directory), state_dict=state)
            self.log(f"saved {'LoRA adapter' if is_peft_model(policy) else 'model'} to {directory}")
        torch.distributed.barrier()
        return directory


def _enable_gradient_checkpointing(policy: nn.Module) -> None:
    base = unwrap_model(policy)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; set it off in the run config")
    # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings under LoRA) and
    # composes with ZeRO-3's parameter hooks.
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(base.config, "use_cache"):
        base.config.use_cache = False
