"""Float64 reference for the fused ops, written for readability: full logits and log_softmax.

The same code on operands of another dtype, with ``softmax_dtype=torch.float32``, is what an eager model of
that dtype computes (its logits rounded to that dtype, the softmax in fp32): the baseline the CUDA cases
(tests/test_cuda_kernels.py) measure their tolerances from.
"""

import torch


def full_logits(hidden, weight, bias=None, *, temperature=1.0, softcap=None):
    """The logits the ops compute, in the operands' dtype: ``hidden @ weight.T + bias``, soft-capped to
    ``softcap * tanh(. / softcap)`` when ``softcap`` is given, then divided by ``temperature``."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def reference_token_kl(hidden, weight, targets, ref_hidden=None, ref_weight=None, *, bias=None, ref_bias=None,
                       temperature=1.0, ignore_index=-100, softcap=None, softmax_dtype=None):
    """Per-position (logp, ref_logp, kl_forward, kl_reverse), or logp alone without a reference model; 0 at
    ignored positions.

    Differentiable w.r.t. the leaves passed in; callers upcast to float64 for the reference. The logits are
    computed in the operands' dtype and upcast to ``softmax_dtype`` (default: the operands' dtype) before the
    softmax.
    """
    def log_softmax(logits):
        return torch.log_softmax(logits if softmax_dtype is None else logits.to(softmax_dtype), dim=-1)

    log_p = log_softmax(full_logits(hidden, weight, bias, temperature=temperature, softcap=softcap))
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    logp = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * keep
    if ref_hidden is None:
        return logp
    log_q = log_softmax(full_logits(ref_hidden, ref_weight, ref_bias, temperature=temperature, softcap=softcap))
    ref_logp = log_q.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * keep
    kl_forward = (log_q.exp() * (log_q - log_p)).sum(-1) * keep  # KL(pi_ref || pi_theta)
    kl_reverse = (log_p.exp() * (log_p - log_q)).sum(-1) * keep  # KL(pi_theta || pi_ref)
    return logp, ref_logp, kl_forward, kl_reverse


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute when expected is all zeros)."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def reference_outputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    upstream: dict[str, torch.Tensor],
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    head_trains: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    softmax_dtype: torch.dtype | None = None,
    rows_per_chunk: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`reference_token_kl` over chunks of ``rows_per_chunk`` rows (all at once by default), so that a
    float64 [rows, V] fits in memory at real vocabularies, with the gradients of
    ``sum_k (upstream[k] * output_k).sum()``.

    ``hidden`` [N, d], ``weight`` [V, d], ``bias`` [V] or None, the reference's likewise or None (then the
    only output is ``logp``); ``targets`` [N] int64; ``upstream`` maps output names (``logp``,
    ``kl_forward``, ``kl_reverse``) to [N] weights. Returns (values, grads): values maps every output name to
    [N] float64; grads holds ``hidden`` [N, d] and, with ``head_trains``, ``weight`` and ``bias`` (if given),
    each in its operand's dtype. The head's gradient sums over chunks in at least fp32 and is rounded to its
    dtype once, as one unchunked product would be.
    """
    unknown = set(upstream) - {"logp", "kl_forward", "kl_reverse"}
    if unknown:
        raise ValueError(f"upstream: expected keys among logp, kl_forward, kl_reverse; got {sorted(unknown)}")
    has_ref = ref_hidden is not None
    names = ("logp", "ref_logp", "kl_forward", "kl_reverse") if has_ref else ("logp",)
    n = hidden.shape[0]
    step = max(1, rows_per_chunk or n)
    head = [x for x in (weight, bias) if x is not None] if head_trains else []
    head_leaves = [x.detach().requires_grad_() for x in head]
    w_leaf = head_leaves[0] if head_trains else weight.detach()
    b_leaf = head_leaves[1] if head_trains and bias is not None else bias
    head_sums = [torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
                 for x in head]
    values = {k: torch.zeros(n, dtype=torch.float64, device=hidden.device) for k in names}
    dh = torch.zeros_like(hidden)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        h = hidden[rows].detach().requires_grad_()
        outs = reference_token_kl(
            h, w_leaf, targets[rows], None if not has_ref else ref_hidden[rows], ref_weight, bias=b_leaf,
            ref_bias=ref_bias, temperature=temperature, ignore_index=ignore_index, softcap=softcap,
            softmax_dtype=softmax_dtype,
        )
        outs = dict(zip(names, outs if has_ref else (outs,)))
        total = sum((upstream[k][rows].to(outs[k].dtype) * outs[k]).sum() for k in upstream)
        grads = torch.autograd.grad(total, [h, *head_leaves])
        dh[rows] = grads[0]
        for acc, g in zip(head_sums, grads[1:]):
            acc += g
        for k, v in outs.items():
            values[k][rows] = v.detach().double()
    result = {"hidden": dh}
    for name, x, acc in zip(("weight", "bias"), head, head_sums):
        result[name] = acc.to(x.dtype)
    return values, result
