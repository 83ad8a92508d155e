"""The preference blocks through the model's own forward: their hidden states, their targets, and the patch that
runs a request inside the forward of the module DeepSpeed wraps.

Under DeepSpeed ZeRO-3 a partitioned ``lm_head.weight`` is whole only while the forward of the module that
DeepSpeed wraps is running. So, like TRL's fused LM head, the policy's ``forward`` is patched once
(:func:`add_firempo_forward`): ``model(firempo=request)`` runs ``request`` on the unwrapped Hugging Face model
inside that forward, and every other call is the model's original forward, untouched. Under FSDP2
(``fully_shard``) the root's parameters are whole inside the root's forward; a head that FSDP2 shards as a unit
of its own (accelerate's plugin does) is gathered there by :func:`gather_head_for_backward`, so that FSDP's
reduce-scatter still carries its gradient.
A request is either
:class:`HiddenStatesRequest` (the reference passes) or :class:`LossRequest` (the policy passes, the head
and the fused loss). peft and DeepSpeed wrappers pass the keyword through unchanged.

This module is the bottom of the training stack: :mod:`.reference` runs its requests, :mod:`.precompute`
stores what they give, :mod:`.forward` puts the loss together from both.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from firempo_kernels.losses import FiReMPOLoss, FiReMPOOutput
from firempo_kernels.precomputed_reference import PrecomputedReference

from .batch import PreferenceBatch
from .models import ModelAdapter, get_adapter, unwrap_model
from .packing import can_pack, pack_rows, packed_hidden_states

__all__ = [
    "block_hidden_states",
    "block_targets",
    "HiddenStatesRequest",
    "LossRequest",
    "add_firempo_forward",
    "call_with_request",
    "is_sharded_tensor",
    "gather_head_for_backward",
]


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
        if is_sharded_tensor(weight) or is_sharded_tensor(bias):
            gather_head_for_backward(model, weight)
            weight, bias = adapter.head(model)
        ref_weight, ref_bias = self.reference_head if self.reference_head is not None else (None, None)
        if ref_weight is weight:
            ref_weight, ref_bias = None, None  # the loss then shares the head (and its bias) explicitly
        return self.loss_fn(
            weight, hidden, self.reference, labels, span_weights, has_corrupted,
            ref_weight=ref_weight, bias=bias, ref_bias=ref_bias, num_examples_in_batch=self.num_examples_in_batch,
        )


def gather_head_for_backward(model: nn.Module, weight: torch.Tensor) -> None:
    """All-gather the FSDP2 module that holds the head ``weight`` (a ``DTensor`` shard here) into its whole
    parameters, which the module then exposes.

    accelerate's FSDP2 plugin shards ``lm_head`` (with the final norm where it finds one) as a unit of its own,
    gathered by that unit's forward; the fused loss reads the weight without calling the module, so the
    gather is made here, through FSDP's own ``unshard``. The gradient then lands on the gathered parameter
    and FSDP's end-of-backward pass reduce-scatters it (averaged over ranks, as every other gradient) and
    reshards the unit. A ``DTensor.full_tensor()`` instead would send the gradient to the shard summed over the
    ranks, past FSDP's averaging: twice the update on two ranks.
    """
    from torch.distributed.fsdp import FSDPModule

    name = next((n for n, p in model.named_parameters() if p is weight), None)
    if name is None:
        raise RuntimeError(f"{type(model).__name__}: the output head's weight is not a parameter of the model")
    owner = None
    path = name.split(".")[:-1]
    for depth in range(len(path) + 1):  # the deepest fully_shard-ed module above the weight owns it
        module = model.get_submodule(".".join(path[:depth]))
        if isinstance(module, FSDPModule):
            owner = module
    if owner is None:
        raise RuntimeError(f"{type(model).__name__}: the output head is a DTensor that no FSDP2 module holds")
    owner.unshard()


def is_sharded_tensor(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter that FSDP2's ``fully_shard`` holds as a shard outside
    the forward of its owning module)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


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

