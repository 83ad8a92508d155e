"""The FiRe-MPO loss family (layer 3): span-level DPO rewards, the visual-contrastive term and the two-sided
token KL, computed from hidden states by the fused ops (docs/design.md section 1).

    FiReMPOLoss(beta, alpha, gamma, lambda_, visual_pairing, temperature, ignore_index, softcap)   nn.Module
    firempo_loss(weight, hidden, ref_hidden, labels, span_weights, ...)                   functional twin
    FiReMPOLoss.rrpo() / .mask_dpo() / .dpo() / .from_preset(name), LOSS_PRESETS          the baselines

How it is computed: the span tokens (weight > 0) of all rows are gathered first, (v, y+) first; the head runs
on them only, in one call of :func:`fused_linear_token_kl` that yields the policy and reference log-probs
everywhere and both KL directions, which get a non-zero weight (and hence a backward over the reference
logits) only at the (v, y+) tokens. Per-row weighted sums come from one ``index_add`` in float64, Delta as
the sum of per-token differences, so that long rows lose nothing to the sums (docs/design.md section 5).
"""

from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import _validate as v
from .ops import fused_linear_logprobs, fused_linear_token_kl, token_kl_with_kl_rows
from .precomputed_reference import PrecomputedReference
from .span_tokens import BLOCK_NAMES, SpanTokens, gather_rows, gather_span_tokens

VISUAL_PAIRINGS = ("reversed", "same_response", "cross")

LOSS_PRESETS: "MappingProxyType[str, MappingProxyType[str, Any]]" = MappingProxyType({
    "firempo": MappingProxyType({}),
    "rrpo": MappingProxyType({"gamma": 0.0, "lambda_": 1.0}),
    "mask_dpo": MappingProxyType({"gamma": 0.0, "alpha": 0.0}),
    "dpo": MappingProxyType({"gamma": 0.0, "alpha": 0.0}),
})
"""Hyperparameters that turn FiRe-MPO into the paper's baselines (the rest keep their defaults).
``dpo`` is ``mask_dpo`` with span weight 1 on every response token, which the caller provides."""


class FiReMPOOutput(NamedTuple):
    """What the FiRe-MPO loss returns."""

    loss: torch.Tensor
    """Scalar, float32 (float64 for float64 inputs): the sum of the per-example losses divided by
    ``num_examples_in_batch`` (by default B, i.e. the mean over the batch)."""
    metrics: dict[str, torch.Tensor]
    """Detached scalars (device tensors, no host sync), each a mean over the B examples of this call:

    - ``rewards/chosen``, ``rewards/rejected``: beta * Delta(y+, v), beta * Delta(y-, v);
    - ``rewards/margins``: their difference; ``rewards/accuracies``: the fraction with Delta(y+, v) >
      Delta(y-, v) (0 for an example without span tokens);
    - ``logps/chosen``, ``logps/rejected``: sum over span tokens of w_t * log pi_theta, (v, y+) and (v, y-);
    - ``loss/rank``, ``loss/visual``, ``loss/kl``: the three terms of the loss (the visual one with gamma * c,
      the KL one with alpha); they add up to ``loss`` when ``num_examples_in_batch`` is not given;
    - ``kl/forward``, ``kl/reverse``: KL(ref || policy) and KL(policy || ref) per (v, y+) span token,
      w-weighted mean (NaN without any such token); absent when not computed (precomputed reference with
      alpha = 0);
    - ``visual/margins``: beta times the visual margin, mean over the examples with v' (NaN if none);
      present only when the visual term is (``has_corrupted_image`` given, gamma > 0);
    - ``span_tokens``: the number of span tokens the head ran on, all rows together.
    """


@dataclass(frozen=True)
class _Hyperparameters:
    beta: float
    alpha: float
    gamma: float
    lambda_: float
    visual_pairing: str
    temperature: float
    ignore_index: int
    softcap: float | None = None

    @classmethod
    def validated(cls, fn: str, beta, alpha, gamma, lambda_, visual_pairing, temperature, ignore_index,
                  softcap=None):
        def weight(name, value):
            return v.check_in_range(fn, name, value, 0.0, v.MAX_LOSS_WEIGHT)

        lambda_ = v.check_in_range(fn, "lambda_", lambda_, 0.0, 1.0)
        if visual_pairing not in VISUAL_PAIRINGS:
            raise ValueError(f"{fn}: `visual_pairing` must be one of {VISUAL_PAIRINGS}; got {visual_pairing!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{fn}: `ignore_index` must be an int; got {type(ignore_index).__name__}")
        return cls(
            beta=_check_beta(fn, beta),
            alpha=weight("alpha", alpha),
            gamma=weight("gamma", gamma),
            lambda_=lambda_,
            visual_pairing=visual_pairing,
            temperature=v.check_temperature(fn, temperature),
            ignore_index=ignore_index,
            softcap=v.check_softcap(fn, softcap),
        )

    @property
    def needs_corrupted_pass(self) -> bool:
        """gamma > 0: the visual term reads the (v', .) rows."""
        return self.gamma > 0

    @property
    def needs_reference_hidden(self) -> bool:
        """alpha > 0: the token KL rebuilds the reference distribution at the (v, y+) span tokens."""
        return self.alpha > 0


def _check_beta(fn: str, beta) -> float:
    beta = v.check_in_range(fn, "beta", beta, 0.0, v.MAX_LOSS_WEIGHT)
    if beta == 0.0:
        raise ValueError(f"{fn}: `beta` must be > 0 (it scales every reward); got 0.0")
    return beta


def _check_num_examples(fn: str, num_examples_in_batch) -> None:
    if num_examples_in_batch is None:
        return
    if isinstance(num_examples_in_batch, torch.Tensor):
        if num_examples_in_batch.dim() != 0 or num_examples_in_batch.dtype == torch.bool:
            raise ValueError(
                f"{fn}: `num_examples_in_batch` as a tensor must be a 0-dim number; got shape "
                f"{tuple(num_examples_in_batch.shape)}, dtype {num_examples_in_batch.dtype}"
            )
        # One host read per step (a trainer's token count is a device scalar): 0 or a negative count would
        # otherwise come out as an inf or a sign-flipped loss.
        count = num_examples_in_batch.item()
        if not count >= 1:
            raise ValueError(f"{fn}: `num_examples_in_batch` must be >= 1; got a tensor holding {count}")
        return
    if isinstance(num_examples_in_batch, bool) or not isinstance(num_examples_in_batch, int):
        raise TypeError(
            f"{fn}: `num_examples_in_batch` must be an int or a 0-dim tensor; "
            f"got {type(num_examples_in_batch).__name__}"
        )
    if num_examples_in_batch < 1:
        raise ValueError(f"{fn}: `num_examples_in_batch` must be >= 1; got {num_examples_in_batch}")


def _check_not_partitioned(fn: str, name: str, weight: torch.Tensor) -> None:
    # The usual way to get here is reading a ZeRO-3 partitioned lm_head outside the forward of the module
    # that owns it: the local tensor is an empty placeholder and every shape check downstream would blame
    # the hidden states instead.
    v.check_tensor(fn, name, weight)
    if weight.numel() == 0:
        raise ValueError(
            f"{fn}: `{name}` is empty (shape {tuple(weight.shape)}); a ZeRO-3 partitioned head must be read "
            "inside the forward of the module that owns it, where DeepSpeed has gathered it"
        )


def _check_reference(
    fn: str,
    ref: PrecomputedReference,
    tokens: SpanTokens,
    temperature: float,
    softcap: float | None,
    blocks_read: int,
    ref_weight: torch.Tensor | None,
) -> int:
    """Validate a precomputed reference against this batch's span tokens (and its hidden states against
    ``ref_weight`` when given: the KL needs them); returns S0."""
    if ref.temperature != temperature:
        raise ValueError(
            f"{fn}: `ref_hidden` (a PrecomputedReference) holds log-probs at temperature {ref.temperature}; "
            f"this loss uses temperature {temperature}"
        )
    # A reference read from a store written before the cap existed comes with softcap None: no cap.
    stored_cap = ref.softcap
    if stored_cap != softcap:
        def cap(c):
            return "no softcap" if c is None else f"softcap {c}"

        raise ValueError(
            f"{fn}: `ref_hidden` (a PrecomputedReference) holds log-probs computed with {cap(stored_cap)}; "
            f"this loss uses {cap(softcap)} (`softcap` must match)"
        )
    # Blocks are stored in order, so a reference built with the (v', .) blocks also serves a batch that
    # reads only the first two (no v' rows, or gamma = 0): the tokens read are a prefix of the stored ones.
    v.check_tensor(fn, "ref_hidden.row_counts", ref.row_counts, ndim=2)
    stored_blocks, stored_examples = ref.row_counts.shape
    if stored_examples != tokens.num_examples or stored_blocks < blocks_read:
        raise ValueError(
            f"{fn}: `ref_hidden` (a PrecomputedReference) must have row_counts of shape [k, B] with "
            f"B = {tokens.num_examples} and k >= {blocks_read} (the blocks this batch reads); "
            f"got {list(ref.row_counts.shape)}"
        )
    counts = tokens.row_counts().reshape(tokens.num_blocks, tokens.num_examples).cpu()
    stored = ref.row_counts.cpu()
    differ = counts[:blocks_read] != stored[:blocks_read]
    if bool(differ.any()):
        j, i = (int(x) for x in torch.nonzero(differ)[0])
        raise ValueError(
            f"{fn}: `ref_hidden` (a PrecomputedReference) was built for other span tokens: row {BLOCK_NAMES[j]} "
            f"of example {i} has {int(counts[j, i])} span tokens but the reference holds {int(stored[j, i])}; "
            "build it from the same labels, span_weights and has_corrupted_image"
        )
    v.check_tensor(fn, "ref_hidden.logps", ref.logps, ndim=1)
    v.check_float(fn, "ref_hidden.logps", ref.logps)
    v.check_same_device(fn, {"labels": tokens.index, "ref_hidden.logps": ref.logps})
    if ref.logps.shape[0] != int(stored.sum()):
        raise ValueError(
            f"{fn}: `ref_hidden.logps` must hold row_counts.sum() = {int(stored.sum())} values; "
            f"got {ref.logps.shape[0]}"
        )
    s0 = int(counts[0].sum())
    if ref_weight is not None:
        if ref.hidden is None:
            raise ValueError(
                f"{fn}: alpha > 0 needs the reference hidden states at the (v, y+) span tokens, but "
                "`ref_hidden.hidden` is None (build the reference with keep_hidden=True)"
            )
        v.check_tensor(fn, "ref_hidden.hidden", ref.hidden, ndim=2)
        v.check_same_dtype(fn, "ref_hidden.hidden", ref.hidden, "ref_weight", ref_weight)
        v.check_same_device(fn, {"labels": tokens.index, "ref_hidden.hidden": ref.hidden})
        if ref.hidden.shape[1] != ref_weight.shape[1]:
            raise ValueError(
                f"{fn}: `ref_hidden.hidden` last dimension must equal `ref_weight`.shape[1] = "
                f"{ref_weight.shape[1]}; got shape {tuple(ref.hidden.shape)}"
            )
        if ref.hidden.shape[0] != s0:
            raise ValueError(
                f"{fn}: `ref_hidden.hidden` must hold one row per (v, y+) span token ({s0}); "
                f"got shape {tuple(ref.hidden.shape)}"
            )
    return s0


class _SpanTokenValues(NamedTuple):
    """Per span token, in gather order: ``logp`` (with grad), ``ref_logp``, and the two KL directions
    (None when not computed; non-zero only at the leading (v, y+) tokens when taken from a
    precomputed reference)."""

    logp: torch.Tensor
    ref_logp: torch.Tensor
    kl_forward: torch.Tensor | None
    kl_reverse: torch.Tensor | None


def _evaluate_head(fn, hp, tokens, weight, bias, hidden, ref_hidden, ref_weight, ref_bias, visual):
    """Run the head on the span tokens only, once per token."""
    h = gather_rows(hidden, tokens)
    op_kwargs = {"temperature": hp.temperature, "ignore_index": hp.ignore_index, "softcap": hp.softcap}
    if not isinstance(ref_hidden, PrecomputedReference):
        # One call for every block: the reference log-prob is needed at every span token anyway, and
        # the KL accumulators come free with it. Only the (v, y+) tokens (leading) get a KL gradient.
        out = token_kl_with_kl_rows(
            h, weight, gather_rows(ref_hidden, tokens), ref_weight, tokens.labels,
            int((tokens.rows < tokens.num_examples).sum()) if hp.needs_reference_hidden else 0,
            bias=bias, ref_bias=ref_bias, fn=fn, **op_kwargs,
        )
        return _SpanTokenValues(out.logp, out.ref_logp, out.kl_forward, out.kl_reverse)

    need_kl = hp.needs_reference_hidden
    s0 = _check_reference(
        fn, ref_hidden, tokens, hp.temperature, hp.softcap, 4 if visual else 2, ref_weight if need_kl else None
    )
    # The gathered tokens are a prefix of the stored ones: unread (v', .) rows come last.
    ref_logp = ref_hidden.logps[: tokens.index.shape[0]]
    if not need_kl:
        logp = fused_linear_logprobs(h, weight, tokens.labels, bias=bias, **op_kwargs)
        return _SpanTokenValues(logp, ref_logp, None, None)
    head = fused_linear_token_kl(
        h[:s0], weight, ref_hidden.hidden, ref_weight, tokens.labels[:s0], bias=bias, ref_bias=ref_bias, **op_kwargs
    )
    rest = fused_linear_logprobs(h[s0:], weight, tokens.labels[s0:], bias=bias, **op_kwargs)
    pad = head.kl_forward.new_zeros(rest.shape[0])
    return _SpanTokenValues(
        torch.cat((head.logp, rest)), ref_logp, torch.cat((head.kl_forward, pad)), torch.cat((head.kl_reverse, pad))
    )


def _firempo_loss(
    fn: str,
    hp: _Hyperparameters,
    weight: torch.Tensor,
    hidden: torch.Tensor,
    ref_hidden: "torch.Tensor | PrecomputedReference",
    labels: torch.Tensor,
    span_weights: torch.Tensor,
    has_corrupted_image: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    num_examples_in_batch: "int | torch.Tensor | None",
) -> FiReMPOOutput:
    _check_not_partitioned(fn, "weight", weight)
    v.check_head(fn, "weight", weight, "bias", bias)
    v.check_tensor(fn, "labels", labels, ndim=2)
    v.check_hidden(fn, "hidden", hidden, "weight", weight, labels)
    if ref_weight is None:
        # A shared head is shared with its bias.
        ref_weight, ref_bias = weight, (bias if ref_bias is None else ref_bias)
    _check_not_partitioned(fn, "ref_weight", ref_weight)
    v.check_head(fn, "ref_weight", ref_weight, "ref_bias", ref_bias)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{fn}: `ref_weight` must have the vocabulary size of `weight` ({weight.shape[0]}); "
            f"got {ref_weight.shape[0]}"
        )
    if not isinstance(ref_hidden, PrecomputedReference):
        if not isinstance(ref_hidden, torch.Tensor):
            raise TypeError(
                f"{fn}: `ref_hidden` must be a torch.Tensor or a PrecomputedReference; got {type(ref_hidden).__name__}"
            )
        v.check_hidden(fn, "ref_hidden", ref_hidden, "ref_weight", ref_weight, labels)
    _check_num_examples(fn, num_examples_in_batch)

    # With gamma = 0 the (v', .) rows carry no loss: leave them out rather than run the head on them.
    visual = has_corrupted_image is not None and hp.needs_corrupted_pass
    tokens = gather_span_tokens(
        fn, labels, span_weights, has_corrupted_image,
        vocab=weight.shape[0], ignore_index=hp.ignore_index, include_corrupted=visual,
    )
    b, k = tokens.num_examples, tokens.num_blocks
    values = _evaluate_head(fn, hp, tokens, weight, bias, hidden, ref_hidden, ref_weight, ref_bias, visual)

    acc = values.logp.dtype
    # Every per-row reduction runs in float64 (docs/design.md section 5): a dense row of T tokens sums to
    # about -T log V, and fp32 sums of that size, accumulated one token at a time and then subtracted
    # (policy minus reference), lose more than the per-token values carry. The operands are [S] and the
    # results [k * B], so the wide dtype costs nothing next to the head; the backward casts the gradients
    # back to the fp32 per-token tensors.
    wide = torch.float64
    w = tokens.weights.to(wide)
    kl_w = torch.where(tokens.rows < b, w, 0.0)
    logp = values.logp.to(wide)
    has_kl = values.kl_forward is not None
    use_kl = has_kl and hp.alpha > 0
    # Delta sums the per-token differences, not two sums: the difference of two fp32 values is exact in
    # float64, so Delta carries only the per-token errors. Detach what the loss does not use, so the
    # backward neither carries nor rebuilds it.
    columns = [w * (logp - values.ref_logp.to(wide)), w * logp.detach()]
    if has_kl:
        columns += [
            kl_w * (values.kl_forward if use_kl and hp.lambda_ > 0 else values.kl_forward.detach()).to(wide),
            kl_w * (values.kl_reverse if use_kl and hp.lambda_ < 1 else values.kl_reverse.detach()).to(wide),
        ]
    sums = logp.new_zeros((k * b, len(columns))).index_add_(0, tokens.rows, torch.stack(columns, dim=1))
    delta = sums[:, 0].reshape(k, b)

    rank = -F.logsigmoid(hp.beta * (delta[0] - delta[1]))
    visual_loss = kl_loss = torch.zeros_like(rank)
    if visual:
        c = tokens.has_corrupted_image.to(wide)
        visual_margin = {
            "reversed": delta[3] - delta[2],
            "same_response": delta[0] - delta[2],
            "cross": delta[0] - delta[3],
        }[hp.visual_pairing]
        visual_loss = -hp.gamma * c * F.logsigmoid(hp.beta * visual_margin)
    if use_kl:
        kl_loss = hp.alpha * (hp.lambda_ * sums[:b, 2] + (1 - hp.lambda_) * sums[:b, 3])
    per_example = rank + visual_loss + kl_loss
    # One rounding to the output dtype, at the very end.
    loss = (per_example.sum() / (b if num_examples_in_batch is None else num_examples_in_batch)).to(acc)

    with torch.no_grad():
        metrics = {
            "rewards/chosen": hp.beta * delta[0].mean(),
            "rewards/rejected": hp.beta * delta[1].mean(),
            "rewards/margins": hp.beta * (delta[0] - delta[1]).mean(),
            "rewards/accuracies": (delta[0] > delta[1]).to(wide).mean(),
            "logps/chosen": sums[:b, 1].mean(),
            "logps/rejected": sums[b : 2 * b, 1].mean(),
            "loss/rank": rank.mean(),
            "loss/visual": visual_loss.mean(),
            "loss/kl": kl_loss.mean(),
        }
        if has_kl:
            metrics["kl/forward"] = sums[:b, 2].sum() / kl_w.sum()
            metrics["kl/reverse"] = sums[:b, 3].sum() / kl_w.sum()
        if visual:
            metrics["visual/margins"] = hp.beta * (c * visual_margin).sum() / c.sum()
        metrics["span_tokens"] = torch.tensor(float(tokens.index.shape[0]), dtype=wide, device=loss.device)
        # Reported in the loss's dtype, each rounded once from its float64 value.
        metrics = {name: value.detach().to(acc) for name, value in metrics.items()}
    return FiReMPOOutput(loss, metrics)


_ARGS_DOC = """
    Args:
        weight: [V, d] policy head (``lm_head.weight``), float32/bfloat16/float16 (float64 on the torch
            backend). Gets a gradient only if it requires one (a frozen head costs no dW).
        hidden: [k * B, T, d] policy hidden states, the dtype of ``weight``. ``hidden[r, t]`` predicts
            ``labels[r, t]`` (already shifted). Rows in blocks of B: (v, y+), (v, y-) and, when
            ``has_corrupted_image`` is given, (v', y+), (v', y-).
        ref_hidden: [k * B, T, d'] reference hidden states, the dtype of ``ref_weight``; never gets a
            gradient. Or a :class:`PrecomputedReference` of this batch, which replaces the reference forward.
        labels: [k * B, T] integer targets, in [0, V) wherever the span weight is > 0.
        span_weights: [k * B, T] floating, finite, >= 0, and 0 where ``labels == ignore_index``; w_t of the
            equations (1 inside the tagged spans and 0 outside reproduces the paper). Only positions with
            w_t > 0 are read; a row may have none (an example with none at all has rank term log 2 and no
            gradient, and counts in the mean).
        has_corrupted_image: [B] bool, c of the equations, or None (k = 2, no visual term). Rows of
            examples with c = 0 are not read.
        ref_weight: [V, d'] reference head; default ``weight`` (then ``ref_bias`` defaults to ``bias``),
            which is right only while the policy's head is the reference's (frozen, as with LoRA on the
            language model). Pass the reference's own head when it differs (another model, or a head that
            trains), with a precomputed reference too: its hidden states go through this head.
        bias, ref_bias: optional [V] head biases.
        num_examples_in_batch: divide the summed per-example losses by this instead of B. Give every
            micro-batch of an accumulation window the window's total number of examples, and the summed
            gradients equal those of the window's mean. An int >= 1, or a 0-dim tensor (e.g. all-reduced).

    Returns:
        :class:`FiReMPOOutput` (scalar ``loss`` and detached ``metrics``).
"""


def firempo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    ref_hidden: "torch.Tensor | PrecomputedReference",
    labels: torch.Tensor,
    span_weights: torch.Tensor,
    has_corrupted_image: torch.Tensor | None = None,
    *,
    ref_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    num_examples_in_batch: "int | torch.Tensor | None" = None,
    beta: float = 0.1,
    alpha: float = 0.01,
    gamma: float = 0.1,
    lambda_: float = 0.5,
    visual_pairing: str = "reversed",
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> FiReMPOOutput:
    """The FiRe-MPO loss, functional form of :class:`FiReMPOLoss` (hyperparameters documented there).

    Mean over the B examples of
    ``-log sigmoid(beta * (Delta(y+, v) - Delta(y-, v))) - gamma * c * log sigmoid(beta * m_visual)
    + alpha * sum_{t in M(y+), image v} w_t * (lambda_ * KL(ref || policy) + (1 - lambda_) * KL(policy || ref))``
    with ``Delta(y, v) = sum_t w_t * (log pi_theta - log pi_ref)`` over the span tokens (docs/design.md section 1).
    For a baseline, pass ``**LOSS_PRESETS[name]``.
    """
    hp = _Hyperparameters.validated(
        "firempo_loss", beta, alpha, gamma, lambda_, visual_pairing, temperature, ignore_index, softcap
    )
    return _firempo_loss(
        "firempo_loss", hp, weight, hidden, ref_hidden, labels, span_weights, has_corrupted_image,
        ref_weight, bias, ref_bias, num_examples_in_batch,
    )


firempo_loss.__doc__ += _ARGS_DOC


class FiReMPOLoss(torch.nn.Module):
    """FiRe-MPO preference loss on hidden states: span-level DPO rewards, a visual-contrastive term on
    corrupted images and a two-sided token KL to the reference, without any tokens x vocab logits.

    Args:
        beta: in (0, 1e6], scale of the implicit rewards.
        alpha: in [0, 1e6], weight of the token KL (0 turns it off: no KL gradient, no reference-logit rebuild).
        gamma: in [0, 1e6], weight of the visual-contrastive term (0: the (v', .) rows are not read).
        lambda_: in [0, 1], share of KL(ref || policy) in the KL term; ``1 - lambda_`` goes to KL(policy || ref).
        visual_pairing: the visual margin ``m_visual``: ``"reversed"`` (the paper's: Delta(y-, v') -
            Delta(y+, v')), ``"same_response"`` (Delta(y+, v) - Delta(y+, v')) or ``"cross"``
            (Delta(y+, v) - Delta(y-, v')).
        temperature: in [1e-6, 1e6]; both models' logits are divided by it.
        ignore_index: label of positions that are not targets.
        softcap: None (default: no cap, nothing computed for it), or the model's
            ``config.final_logit_softcapping``, a float in [1e-6, 1e6]: both models' logits become
            ``softcap * tanh(logits / softcap)`` before the temperature, as Gemma 2, PaliGemma 2 and Gemma 3n
            compute them. A :class:`PrecomputedReference` must have been built with the same cap.

    Presets: :meth:`rrpo`, :meth:`mask_dpo`, :meth:`dpo`, or :meth:`from_preset` by name (see ``LOSS_PRESETS``).
    Call it as ``loss_fn(weight, hidden, ref_hidden, labels, span_weights, has_corrupted_image=None, *,
    ref_weight=None, bias=None, ref_bias=None, num_examples_in_batch=None)``; see :meth:`forward`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.01,
        gamma: float = 0.1,
        lambda_: float = 0.5,
        visual_pairing: str = "reversed",
        temperature: float = 1.0,
        ignore_index: int = -100,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self._hp = _Hyperparameters.validated(
            "FiReMPOLoss", beta, alpha, gamma, lambda_, visual_pairing, temperature, ignore_index, softcap
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "FiReMPOLoss":
        """The loss of a named configuration in ``LOSS_PRESETS``, with ``overrides`` applied on top."""
        if name not in LOSS_PRESETS:
            raise ValueError(f"FiReMPOLoss.from_preset: `name` must be one of {tuple(LOSS_PRESETS)}; got {name!r}")
        return cls(**{**LOSS_PRESETS[name], **overrides})

    @classmethod
    def rrpo(cls, **overrides: Any) -> "FiReMPOLoss":
        """RRPO: no visual term, forward KL only (gamma = 0, lambda_ = 1)."""
        return cls.from_preset("rrpo", **overrides)

    @classmethod
    def mask_dpo(cls, **overrides: Any) -> "FiReMPOLoss":
        """MASK-DPO: span-level DPO rewards only (gamma = 0, alpha = 0)."""
        return cls.from_preset("mask_dpo", **overrides)

    @classmethod
    def dpo(cls, **overrides: Any) -> "FiReMPOLoss":
        """DPO (gamma = 0, alpha = 0); give span weight 1 to every response token for sequence rewards."""
        return cls.from_preset("dpo", **overrides)

    @property
    def needs_corrupted_pass(self) -> bool:
        """True when gamma > 0: the visual term reads the (v', y+) and (v', y-) passes, so the policy and
        the reference must run on the corrupted images (of the examples that have one). When False the loss
        leaves those rows out even if ``has_corrupted_image`` is given, and a caller may skip the two passes
        (read-only)."""
        return self._hp.needs_corrupted_pass

    @property
    def needs_reference_hidden(self) -> bool:
        """True when alpha > 0: the token KL needs the reference's full next-token distribution at the
        (v, y+) span tokens, i.e. its hidden states there and its head, not only its target log-probs. A
        :class:`PrecomputedReference` must then be built with ``keep_hidden=True``; when False, log-probs
        alone suffice (read-only)."""
        return self._hp.needs_reference_hidden

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={val!r}" for k, val in asdict(self._hp).items())

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        ref_hidden: "torch.Tensor | PrecomputedReference",
        labels: torch.Tensor,
        span_weights: torch.Tensor,
        has_corrupted_image: torch.Tensor | None = None,
        *,
        ref_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        num_examples_in_batch: "int | torch.Tensor | None" = None,
    ) -> FiReMPOOutput:
        """The loss of one (micro-)batch."""
        return _firempo_loss(
            "FiReMPOLoss", self._hp, weight, hidden, ref_hidden, labels, span_weights, has_corrupted_image,
            ref_weight, bias, ref_bias, num_examples_in_batch,
        )


FiReMPOLoss.forward.__doc__ += _ARGS_DOC
# Read-only views of the validated hyperparameters: changing one after construction would skip the checks.
for _name in _Hyperparameters.__dataclass_fields__:
    setattr(FiReMPOLoss, _name, property(lambda self, _n=_name: getattr(self._hp, _n), doc=f"``{_name}`` (read-only)."))
del _name
