"""FiRe-MPO inside the model's own forward: hidden states of the preference blocks, the head read where
ZeRO-3 can give it whole, and the thin loss adapter for custom loops and trainers.

Under DeepSpeed ZeRO-3 a partitioned ``lm_head.weight`` is whole only while the forward of the module that
DeepSpeed wraps is running. So, like TRL's fused LM head, the policy's ``forward`` is patched once
(:func:`add_firempo_forward`): ``model(firempo=request)`` runs ``request`` on the unwrapped Hugging Face model
inside that forward, and every other call is the model's original forward, untouched. A request is either
:class:`HiddenStatesRequest` (the reference passes) or :class:`LossRequest` (the policy passes, the head
and the fused loss). peft and DeepSpeed wrappers pass the keyword through unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from firempo_kernels.losses import FiReMPOLoss, FiReMPOOutput
from firempo_kernels.precomputed_reference import PrecomputedReference

from .batch import PreferenceBatch
from .models import ModelAdapter, get_adapter, unwrap_model
from .packing import can_pack, pack_rows, packed_hidden_states

if TYPE_CHECKING:
    from .reference import Reference

__all__ = [
    "block_hidden_states",
    "block_targets",
    "HiddenStatesRequest",
    "LossRequest",
    "add_firempo_forward",
    "call_with_request",
    "compute_firempo_loss",
    "loss_for_model",
]


_HYPERPARAMETERS = ("beta", "alpha", "gamma", "lambda_", "visual_pairing", "temperature", "ignore_index")


def loss_for_model(loss_fn: FiReMPOLoss, model: nn.Module, adapter: ModelAdapter | None = None) -> FiReMPOLoss:
    """``loss_fn`` with the model's logit soft-cap (``final_logit_softcapping``): itself when the caps agree
    (both None for most models), else a copy with the model's cap, so that a configured loss serves Gemma 2,
    PaliGemma 2 and Gemma 3n as it serves any other model.

    Raises:
        ValueError: ``loss_fn`` sets a cap other than the model's.
    """
    cap = (adapter or get_adapter(model)).logit_softcap(model)
    have = getattr(loss_fn, "softcap", None)
    if have == cap:
        return loss_fn
    if have is not None:
        raise ValueError(
            f"loss_fn: `softcap={have}` differs from the model's final_logit_softcapping={cap}; the loss must see "
            "the logits the model computes (leave `softcap` unset: it is read from the model)"
        )
    return FiReMPOLoss(**{name: getattr(loss_fn, name) for name in _HYPERPARAMETERS}, softcap=cap)


def _repeat_for_both_responses(images: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vision inputs of B examples -> those of the 2B rows (chosen rows, then rejected rows)."""
    return {key: torch.cat((value, value)) for key, value in images.items()}


def block_hidden_states(
    adapter: ModelAdapter, model: nn.Module, batch: PreferenceBatch, corrupted: bool, shared_prefix: bool = False
) -> torch.Tensor:
    """[k * B, T - 1, d]: hidden states of the blocks (v, y+), (v, y-) and, if ``corrupted``, (v', y+),
    (v', y-), each position predicting the next token. One model call per image kind; with ``shared_prefix``
    (and an attention implementation that takes the mask) the two rows of an example share their prompt's
    forward (:mod:`.packing`)."""
    passes = [batch.images] + ([batch.corrupted_images] if corrupted else [])
    packed = pack_rows(adapter, model, batch, _repeat_for_both_responses(batch.images)) \
        if shared_prefix and can_pack(model, adapter) else None
    if packed is not None:
        hidden = [packed_hidden_states(adapter, model, images, packed)[:, :-1] for images in passes]
    else:
        hidden = [
            adapter.hidden_states(model, batch.input_ids, batch.attention_mask,
                                  _repeat_for_both_responses(images), prompt_lengths=batch.prompt_lengths)[:, :-1]
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


@dataclasses.dataclass
class HiddenStatesRequest:
    """Run inside a forward: the block hidden states of ``batch`` (see :func:`block_hidden_states`)."""

    batch: PreferenceBatch
    corrupted: bool
    shared_prefix: bool = False

    def run(self, model: nn.Module, adapter: ModelAdapter) -> torch.Tensor:
        return block_hidden_states(adapter, model, self.batch, self.corrupted, self.shared_prefix)


@dataclasses.dataclass
class LossRequest:
    """Run inside the policy's forward: policy hidden states, the head (whole there under ZeRO-3), the loss.

    Attributes:
        batch: the collated batch, on the model's device.
        loss_fn: the configured loss.
        reference: the reference side, from :meth:`.reference.Reference.hidden_states`.
        reference_head: ``(weight, bias)`` of the reference head, or None when it is the policy's own.
        corrupted: whether the (v', .) blocks run.
        num_examples_in_batch: passed to the loss (the examples of the whole accumulation window).
        shared_prefix: the two rows of an example share their prompt's forward (:mod:`.packing`).
    """

    batch: PreferenceBatch
    loss_fn: FiReMPOLoss
    reference: torch.Tensor | PrecomputedReference
    reference_head: tuple[torch.Tensor, torch.Tensor | None] | None
    corrupted: bool
    num_examples_in_batch: int | torch.Tensor | None = None
    shared_prefix: bool = False

    def run(self, model: nn.Module, adapter: ModelAdapter) -> FiReMPOOutput:
        hidden = block_hidden_states(adapter, model, self.batch, self.corrupted, self.shared_prefix)
        labels, span_weights, has_corrupted = block_targets(self.batch, self.corrupted)
        weight, bias = adapter.head(model)
        ref_weight, ref_bias = self.reference_head if self.reference_head is not None else (None, None)
        if ref_weight is weight:
            ref_weight, ref_bias = None, None  # the loss then shares the head (and its bias) explicitly
        return self.loss_fn(
            weight, hidden, self.reference, labels, span_weights, has_corrupted,
            ref_weight=ref_weight, bias=bias, ref_bias=ref_bias, num_examples_in_batch=self.num_examples_in_batch,
        )


_PATCHED = "_firempo_original_forward"


def add_firempo_forward(model: nn.Module) -> nn.Module:
    """Patch ``model.forward`` (a Hugging Face model; wrappers are seen through) so that
    ``model(firempo=request)`` runs ``request.run(model, adapter)`` inside the forward; idempotent; returns
    ``model``.

    Without ``firempo=`` the forward is the original one, so generation and every other use are unchanged.
    The adapter (whose checks read the config and the head) is resolved here, once, not on every step.
    """
    base = unwrap_model(model)
    if getattr(base, _PATCHED, None) is not None:
        return model
    adapter = get_adapter(base)
    original = base.forward

    @functools.wraps(type(base).forward)
    def forward(self, *args: Any, firempo: HiddenStatesRequest | LossRequest | None = None, **kwargs: Any):
        if firempo is None:
            return original(*args, **kwargs)
        # peft forwards its own keywords as None; anything else would be silently ignored, so refuse it.
        stray = [k for k, v in kwargs.items() if v is not None]
        if args or stray:
            raise TypeError(
                f"{type(self).__name__}.forward(firempo=...) takes no other input; got "
                f"{len(args)} positional and {stray}"
            )
        return firempo.run(self, adapter)

    base.forward = types.MethodType(forward, base)
    setattr(base, _PATCHED, original)
    return model


def call_with_request(model: nn.Module, request: HiddenStatesRequest | LossRequest):
    """``model(firempo=request)``: through every wrapper's forward (DeepSpeed, peft) to the patched model."""
    add_firempo_forward(model)
    return model(firempo=request)


def compute_firempo_loss(
    model: nn.Module,
    reference: Reference | nn.Module | PrecomputedReference | str,
    batch: PreferenceBatch,
    loss_fn: FiReMPOLoss,
    *,
    reference_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    num_examples_in_batch: int | torch.Tensor | None = None,
    corrupted_pass: bool | None = None,
    shared_prefix: bool = True,
) -> FiReMPOOutput:
    """The FiRe-MPO loss of one collated batch: the thin adapter for custom loops and any ``Trainer``.

    Runs the reference (no graph), then the policy on the 2B token rows with the clean images and, when the
    loss has a visual term (``loss_fn.needs_corrupted_pass``) and the batch has v', once more with the
    corrupted images; the head and the fused loss run inside the policy's forward, so this works unchanged on
    a DeepSpeed ZeRO-3 engine. No ``[rows, T, V]`` logits are formed.

    Args:
        model: the policy: a Hugging Face model with a registered adapter (see
            :mod:`firempo_kernels.integrations.models`), optionally peft- and DeepSpeed-wrapped.
        reference: a :class:`~.reference.Reference`; or a frozen reference model; or ``"adapters_disabled"``
            (``model`` with its peft adapters off); or the batch's :class:`PrecomputedReference` (collated in
            ``batch.example_ids`` order).
        batch: B examples ([2B, T] rows); moved to the model's device if needed.
        loss_fn: the configured :class:`FiReMPOLoss`.
        reference_head: with a :class:`PrecomputedReference` only: its head ``(weight [V, d'], bias or None)``;
            None means the policy's own head.
        num_examples_in_batch: the examples of the whole accumulation window (int or 0-dim tensor), so that
            summed micro-batch gradients equal the window mean's; None: this batch's mean.
        corrupted_pass: whether to run the (v', .) pass (only ever when ``loss_fn.needs_corrupted_pass``).
            Default: when the batch has corrupted images. Under ZeRO-3 every rank must make the same model
            calls, so a distributed caller decides this for all ranks; ``True`` with a batch without v' runs
            the clean images there with c = 0.
        shared_prefix: the chosen and rejected rows of an example share the forward of their common prefix
            (the image and question), in the policy and a live reference alike (:mod:`.packing`); the
            same hidden states, the prompt's work done once. Models whose attention cannot take the packed
            mask run unpacked (said once in the log).

    Returns:
        ``FiReMPOOutput``: scalar float32 ``loss`` with a graph to the trainable parameters, detached metrics.
    """
    from .reference import as_reference

    fn = "compute_firempo_loss"
    if not isinstance(batch, PreferenceBatch):
        raise TypeError(f"{fn}: `batch` must be a PreferenceBatch; got {type(batch).__name__}")
    if not isinstance(loss_fn, FiReMPOLoss):
        raise TypeError(f"{fn}: `loss_fn` must be a FiReMPOLoss; got {type(loss_fn).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: `model` must be an nn.Module; got {type(model).__name__}")
    ref = as_reference(reference, head=reference_head)
    device = next((p.device for p in unwrap_model(model).parameters()), batch.input_ids.device)
    if batch.input_ids.device != device:
        batch = batch.to(device, non_blocking=True)
    if corrupted_pass is None:
        corrupted_pass = batch.corrupted_images is not None
    corrupted = bool(corrupted_pass) and loss_fn.needs_corrupted_pass
    if corrupted and batch.corrupted_images is None:
        batch = dataclasses.replace(
            batch, corrupted_images=batch.images,
            has_corrupted_image=torch.zeros(batch.num_examples, dtype=torch.bool, device=batch.input_ids.device),
        )
    if not isinstance(shared_prefix, bool):
        raise TypeError(f"{fn}: `shared_prefix` must be a bool; got {type(shared_prefix).__name__}")
    adapter = get_adapter(model)
    loss_fn = loss_for_model(loss_fn, model, adapter)
    ref_adapter, ref_model = getattr(ref, "adapter", None), getattr(ref, "model", None)
    if ref_adapter is not None and ref_adapter.logit_softcap(ref_model) != getattr(loss_fn, "softcap", None):
        # One cap serves both models' logits in the fused op; a reference capped otherwise would be misread.
        raise ValueError(
            f"{fn}: the reference model's final_logit_softcapping={ref_adapter.logit_softcap(ref_model)} differs "
            f"from the policy's {getattr(loss_fn, 'softcap', None)}; the fused loss caps both with one value"
        )
    request = LossRequest(
        batch, loss_fn, ref.hidden_states(model, batch, corrupted, shared_prefix), ref.head(model), corrupted,
        num_examples_in_batch, shared_prefix,
    )
    return call_with_request(model, request)
