"""The FiRe-MPO loss of one batch inside the model's own forward: the thin loss adapter for custom loops and
trainers (:func:`compute_firempo_loss`), over the block requests of :mod:`.blocks` and a reference of
:mod:`.reference`.

Under DeepSpeed ZeRO-3 a partitioned ``lm_head.weight`` is whole only while the forward of the module that
DeepSpeed wraps is running, so the head and the loss run inside the policy's patched forward
(:func:`~.blocks.add_firempo_forward`); every other call is the model's original forward, untouched.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from firempo_kernels.losses import FiReMPOLoss, FiReMPOOutput
from firempo_kernels.precomputed_reference import PrecomputedReference

from . import blocks
from .batch import PreferenceBatch
from .blocks import (
    HiddenStatesRequest,
    LossRequest,
    add_firempo_forward,
    block_hidden_states,
    block_targets,
    call_with_request,
)
from .models import ModelAdapter, get_adapter, unwrap_model
from .reference import Reference, as_reference

# The block names stay importable from here, where custom loops have always found them.
__all__ = [*blocks.__all__, "compute_firempo_loss", "loss_for_model"]


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
