"""The reference model of FiRe-MPO, one abstraction for every place that needs it.

The loss reads two things from the reference: its hidden states at the token positions (or, precomputed,
the per-example :class:`~firempo_kernels.precomputed_reference.PrecomputedReference`) and, for the token KL,
its output head. Three references exist, and the loss adapter, the TRL trainer, the precompute step and
evaluation all take them through :class:`Reference`:

- :class:`FrozenModelReference` -- a separate frozen model (full fine-tuning, or another checkpoint);
- :class:`AdaptersDisabledReference` -- the policy itself with its peft adapters switched off (LoRA, as in
  the paper): no second copy of the weights;
- :class:`~.precompute.PrecomputedStoreReference` -- a store written once by a reference pass (no reference
  forward during training at all), beside the store in :mod:`.precompute`.

Under DeepSpeed ZeRO-3 and FSDP2 a sharded parameter is whole only inside the forward of the module that owns it.
A reference head that differs from the policy's is therefore copied whole once, outside any forward, and
kept (it never changes); a head that IS the policy's is read inside the policy's forward like the policy's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from firempo_kernels.precomputed_reference import PrecomputedReference

from .blocks import HiddenStatesRequest, call_with_request, is_sharded_tensor
from .models import get_adapter, unwrap_model, without_engine

if TYPE_CHECKING:
    from .batch import PreferenceBatch

__all__ = [
    "ADAPTERS_DISABLED",
    "Reference",
    "FrozenModelReference",
    "AdaptersDisabledReference",
    "as_reference",
    "compute_dtype",
    "is_peft_model",
    "placed_reference",
    "whole_head",
]

ADAPTERS_DISABLED: Literal["adapters_disabled"] = "adapters_disabled"
"""Shorthand accepted wherever a reference is: the policy with its peft adapters disabled."""

Head = tuple[torch.Tensor, "torch.Tensor | None"]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped by DeepSpeed or DDP) is a ``peft.PeftModel`` whose adapters can be
    switched off."""
    model = without_engine(model)
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


def _is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def whole_head(head: Head) -> Head:
    """A detached copy of a head that stays whole; a ZeRO-3 partitioned head is gathered for the copy, an FSDP2
    sharded one (a ``DTensor``) is all-gathered with :meth:`DTensor.full_tensor`.

    Must run outside any forward, on every rank at once: gathering a parameter that a running forward holds
    fails in ZeRO-3, and both gathers are collectives.
    """
    weight, bias = head
    if is_sharded_tensor(weight) or is_sharded_tensor(bias):
        return tuple(None if t is None else (t.full_tensor() if is_sharded_tensor(t) else t).detach().clone()
                     for t in (weight, bias))
    params = [t for t in (weight, bias) if t is not None and _is_partitioned(t)]
    if not params:
        return weight.detach(), None if bias is None else bias.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return weight.detach().clone(), None if bias is None else bias.detach().clone()


def _reshard(model: nn.Module) -> None:
    """Free the parameters that FSDP2 gathered for a reference forward. FSDP2 keeps a root module's parameters
    whole after its forward (a backward usually follows); a frozen reference has none, so without this it
    would hold the whole model on every rank, and its head would be FSDP's gathered buffer, not a shard."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


class Reference:
    """What the FiRe-MPO loss reads from the reference model, for one batch.

    Subclasses implement :meth:`hidden_states` and :meth:`head`. ``policy`` arguments are the model being
    trained as the caller holds it (possibly peft- and DeepSpeed-wrapped).
    """

    #: ``"model"``, ``"adapters_disabled"`` or ``"precomputed"``.
    mode: str = ""

    def hidden_states(
        self, policy: nn.Module, batch: PreferenceBatch, corrupted: bool, shared_prefix: bool = False
    ) -> torch.Tensor | PrecomputedReference:
        """The reference side of one batch, without a graph: hidden states ``[k * B, T - 1, d']`` of the
        blocks (v, y+), (v, y-) [, (v', y+), (v', y-)] (see :func:`.forward.block_hidden_states`, also for
        ``shared_prefix``), or the batch's :class:`PrecomputedReference`."""
        raise NotImplementedError

    def head(self, policy: nn.Module) -> Head | None:
        """``(weight [V, d'], bias [V] or None)`` of the reference head for the token KL, or None when it is
        the policy's own head (which the loss then shares)."""
        raise NotImplementedError


class FrozenModelReference(Reference):
    """A separate reference model, frozen and in eval mode (same tokenizer and vocabulary as the policy).

    Args:
        model: the Hugging Face reference model, possibly wrapped by a DeepSpeed inference engine.
    """

    mode = "model"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FrozenModelReference: `model` must be an nn.Module; got {type(model).__name__}")
        self.model = model
        self.adapter = get_adapter(model)
        self._head: Head | None = None

    def hidden_states(self, policy, batch, corrupted, shared_prefix=False):
        with torch.no_grad(), _eval_mode(self.model):
            hidden = call_with_request(self.model, HiddenStatesRequest(batch, corrupted, shared_prefix))
        _reshard(self.model)
        return hidden

    def head(self, policy: nn.Module) -> Head:
        if self._head is None:
            self._head = whole_head(self.adapter.head(self.model))
        return self._head


class AdaptersDisabledReference(Reference):
    """The policy with its peft adapters disabled (or TRL's frozen ``"ref"`` adapter when the policy came with a
    trained adapter and TRL added one): the reference of LoRA training, no second model in memory."""

    mode = ADAPTERS_DISABLED

    def __init__(self) -> None:
        self._head: Head | None = None
        self._head_known = False

    @staticmethod
    def _check(policy: nn.Module) -> nn.Module:
        if not is_peft_model(policy):
            raise TypeError(
                f"reference={ADAPTERS_DISABLED!r} needs a peft model whose adapters can be disabled; got "
                f"{type(without_engine(policy)).__name__}. Pass a separate reference model or a precomputed reference."
            )
        return without_engine(policy)

    @contextlib.contextmanager
    def reference_weights(self, policy: nn.Module) -> Iterator[None]:
        """Within this context ``policy`` computes the reference."""
        peft_model = self._check(policy)
        if "ref" in getattr(peft_model, "peft_config", {}):
            previous = peft_model.active_adapter
            peft_model.set_adapter("ref")
            try:
                yield
            finally:
                peft_model.set_adapter(previous)
        else:
            with peft_model.disable_adapter():
                yield

    def hidden_states(self, policy, batch, corrupted, shared_prefix=False):
        with torch.no_grad(), _eval_mode(policy), self.reference_weights(policy):
            return call_with_request(policy, HiddenStatesRequest(batch, corrupted, shared_prefix))

    def head(self, policy: nn.Module) -> Head | None:
        if not self._head_known:
            peft_model = self._check(policy)
            # A head in `modules_to_save` trains a copy; the reference is the original. Otherwise the head is
            # not adapted at all and the reference's head is the policy's own tensor.
            head_module = unwrap_model(peft_model).get_output_embeddings()
            if type(head_module).__name__ == "ModulesToSaveWrapper":
                adapter = get_adapter(peft_model)
                with self.reference_weights(policy):
                    self._head = whole_head(adapter.head(peft_model))
            self._head_known = True
        return self._head


def compute_dtype(policy: nn.Module) -> torch.dtype | None:
    """The dtype of the policy's first floating-point parameter (its compute dtype), or None if it has none."""
    return next((p.dtype for p in unwrap_model(policy).parameters() if p.is_floating_point()), None)


def placed_reference(
    ref: PrecomputedReference, policy: nn.Module, batch: PreferenceBatch, corrupted: bool
) -> PrecomputedReference:
    """A batch's stored reference on the batch's device, hidden states in the policy's compute dtype (the
    ``[k, 1]`` row counts gain zero rows for a (v', .) pass that no example of the batch has a v' for)."""
    ref = ref.to(batch.input_ids.device, non_blocking=True)
    if corrupted and ref.num_blocks == 2:
        # No example of this batch has v' (c = 0 everywhere): its (v', .) rows hold no span token.
        ref = ref._replace(row_counts=torch.cat((ref.row_counts, torch.zeros_like(ref.row_counts))))
    dtype = compute_dtype(policy)
    if ref.hidden is not None and dtype is not None and ref.hidden.dtype != dtype:
        ref = ref._replace(hidden=ref.hidden.to(dtype))
    return ref


class _FixedPrecomputed(Reference):
    """One batch's precomputed reference given directly (custom loops)."""

    mode = "precomputed"

    def __init__(self, reference: PrecomputedReference, head: Head | None) -> None:
        self.reference, self._head = reference, head

    def hidden_states(self, policy, batch, corrupted, shared_prefix=False):
        return placed_reference(self.reference, policy, batch, corrupted)

    def head(self, policy):
        return self._head


def as_reference(
    reference: Reference | nn.Module | PrecomputedReference | str, *, head: Head | None = None
) -> Reference:
    """A :class:`Reference` from any accepted form: a Reference; a frozen ``nn.Module``; ``"adapters_disabled"``;
    or one batch's :class:`PrecomputedReference` (then ``head`` is its reference head, None for the policy's)."""
    if head is not None and not isinstance(reference, PrecomputedReference):
        raise ValueError("as_reference: `head` goes with a PrecomputedReference only; a live reference has its own")
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, PrecomputedReference):
        return _FixedPrecomputed(reference, head)
    if isinstance(reference, str):
        if reference == ADAPTERS_DISABLED:
            return AdaptersDisabledReference()
        raise ValueError(f"as_reference: the only string accepted is {ADAPTERS_DISABLED!r}; got {reference!r}")
    if isinstance(reference, nn.Module):
        return FrozenModelReference(reference)
    raise TypeError(
        "as_reference: `reference` must be a Reference, an nn.Module, a PrecomputedReference or "
        f"{ADAPTERS_DISABLED!r}; got {type(reference).__name__}"
    )
