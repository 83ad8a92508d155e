"""Per-token statistics shared by both backends (layer 1): the chunked PyTorch implementation of the
forward statistics and of dS, the merge of partial statistics, and the final per-token outputs.

The statistics tensor is ``[NUM_STATS, n]`` (or ``[splits, NUM_STATS, n]`` for partials) with rows
``m_s, z_s, a_s, y_s, m_t, z_t, a_t, y_t``: running max, sum of ``exp(logit - m)``, KL accumulator ``A``
and target logit, for the policy (s) and the reference (t); the same layout the Triton forward writes.
"""

from typing import NamedTuple

import torch

NUM_STATS = 8
M_S, Z_S, A_S, Y_S, M_T, Z_T, A_T, Y_T = range(NUM_STATS)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (used by gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, inv_tau: float,
                 softcap: float | None = None) -> torch.Tensor:
    """Logits of one chunk in the accumulation dtype: x [n, d], w [v, d], b [v] or None -> [n, v].

    ``(x @ w^T + b) * inv_tau``; with ``softcap``, ``softcap * tanh((x @ w^T + b) / softcap) * inv_tau``
    (docs/design.md section 8).
    """
    acc = accumulation_dtype(x.dtype)
    s = x.to(acc) @ w.to(acc).T
    if b is not None:
        s += b.to(acc)
    if softcap is not None:  # cap and temperature as one scale after the tanh: one rounding, one pass
        return s.div_(softcap).tanh_().mul_(softcap * inv_tau)
    return s if inv_tau == 1.0 else s.mul_(inv_tau)  # one pass over the chunk saved at the usual temperature


def softcap_slope(s: torch.Tensor, scale: float) -> torch.Tensor:
    """``1 - tanh^2(z / softcap)`` from capped logits ``s = scale * tanh(z / softcap)``, ``scale = softcap /
    tau``: ds/dz times tau. Same shape and dtype as ``s``, a new tensor.

    Taken from ``s`` rather than from z so that no second chunk of pre-cap logits is kept. r = s / scale is
    tanh to a few ulp, so the slope carries an absolute error of a few ulp: where the tanh saturates in the
    working precision (|z| / softcap > ~9 in fp32) it is 0, as eager autograd's tanh backward (1 - y^2 from
    its output) makes it too.
    """
    # (1 - r)(1 + r) would round the product less, but r's own error (two roundings) dominates either way.
    return (s / scale).square_().neg_().add_(1.0)
def chunk_stats(
    s: torch.Tensor, t: torch.Tensor | None, local_targets: torch.Tensor,
    w: torch.Tensor | None = None, expected: torch.Tensor | None = None, m_floor: torch.Tensor | None = None,
    softcap_scale: float | None = None,
) -> torch.Tensor:
    """Statistics ``[NUM_STATS, n]`` of one logits chunk s [n, v] (t [n, v] or None).

    ``local_targets`` [n] index into this chunk; rows whose target lies outside it get target logit 0.
    ``m_floor`` [n] (or None): the policy's running maximum over earlier chunks; the statistics are taken
    relative to ``max(m_floor, max_v s)``, which merging with the earlier chunks then keeps unchanged.
    ``expected`` [k, d] (with head rows ``w`` [v, d] in the logits' dtype): the running sum over earlier
    chunks of ``exp(s_v - m) w_v`` for the last k rows, E_p[w] before its division by z
    (docs/design.md section 7); it is brought to the new maximum and this chunk's share added, in place.
    ``softcap_scale`` (softcap / tau, with capped logits ``s``): ``expected`` then sums
    ``exp(s_v - m) (1 - tanh^2) w_v``, the chained rows (docs/design.md section 8).
    ``s`` and ``t`` are consumed: their storage is reused for the exponentials, since chunk-sized
    temporaries are the torch path's whole working memory (three chunks at most, one without ``t``).
    """
    n, v = s.shape
    stats = s.new_zeros((NUM_STATS, n))
    in_chunk = (local_targets >= 0) & (local_targets < v)
    idx = local_targets.clamp(0, v - 1)[:, None]

    stats[Y_S] = torch.where(in_chunk, s.gather(1, idx)[:, 0], 0.0)
    stats[M_S] = s.amax(dim=1) if m_floor is None else torch.maximum(s.amax(dim=1), m_floor)
    if t is not None:
        stats[Y_T] = torch.where(in_chunk, t.gather(1, idx)[:, 0], 0.0)
        stats[M_T] = t.amax(dim=1)
        diff = s - t  # s - t, not s and t apart: the KL is a small difference of O(|logit|) terms
    k = 0 if expected is None else expected.shape[0]
    # The slope must be read before s turns into p: one [k, v] buffer, only with a cap.
    slope = softcap_slope(s[n - k:], softcap_scale) if expected is not None and softcap_scale is not None else None
    p = s.sub_(stats[M_S, :, None]).exp_()
    stats[Z_S] = p.sum(dim=1)
    if expected is not None:  # the product accumulates in place: no [k, d] temporary per chunk
        if m_floor is not None:
            expected.mul_(torch.exp(m_floor[n - k:] - stats[M_S, n - k:])[:, None])
        expected.addmm_(p[n - k:] if slope is None else slope.mul_(p[n - k:]), w)
    if t is None:
        return stats
    q = t.sub_(stats[M_T, :, None]).exp_()
    stats[Z_T] = q.sum(dim=1)
    stats[A_S] = p.mul_(diff).sum(dim=1)
    stats[A_T] = -q.mul_(diff).sum(dim=1)
    return stats


def merge_partials(partials: torch.Tensor, has_ref: bool) -> torch.Tensor:
    """Merge ``[splits, NUM_STATS, n]`` partial statistics over disjoint vocabulary slices into one."""
    out = partials.new_zeros(partials.shape[1:])
    sides = ((M_S, Z_S, A_S, Y_S), (M_T, Z_T, A_T, Y_T)) if has_ref else ((M_S, Z_S, A_S, Y_S),)
    for m, z, a, y in sides:
        m_all = partials[:, m].amax(dim=0)
        rescale = torch.exp(partials[:, m] - m_all)
        out[m] = m_all
        out[z] = (partials[:, z] * rescale).sum(dim=0)
        out[a] = (partials[:, a] * rescale).sum(dim=0)
        out[y] = partials[:, y].sum(dim=0)
    return out


class TokenOutputs(NamedTuple):
    """Finalised per-token values, and the three statistics the backward needs."""

    logp: torch.Tensor
    ref_logp: torch.Tensor | None
    kl_forward: torch.Tensor | None
    kl_reverse: torch.Tensor | None
    lse: torch.Tensor
    ref_lse: torch.Tensor | None
    expected_diff: torch.Tensor | None  # E_p[s - t]


def finalize(stats: torch.Tensor, has_ref: bool) -> TokenOutputs:
    """Per-token outputs from merged statistics ``[NUM_STATS, n]`` (docs/design.md sections 3 and 5)."""
    # The log-probs are y - m - log z evaluated in float64 and rounded once: rounding the log-sum-exp to
    # the statistics' dtype first would add a second rounding at its magnitude (~log V), and a long row
    # sums T of these errors (docs/design.md section 5). The backward keeps reading lse in that dtype.
    wide = torch.float64

    def log_prob(m: int, z: int, y: int) -> torch.Tensor:
        return (stats[y].to(wide) - stats[m].to(wide) - torch.log(stats[z].to(wide))).to(stats.dtype)

    lse = stats[M_S] + torch.log(stats[Z_S])
    logp = log_prob(M_S, Z_S, Y_S)
    if not has_ref:
        return TokenOutputs(logp, None, None, None, lse, None, None)
    ref_lse = stats[M_T] + torch.log(stats[Z_T])
    expected_diff = stats[A_S] / stats[Z_S]
    # lse - ref_lse as (m_s - m_t) + log(z_s / z_t), in float64: when the models nearly agree both
    # log-sum-exps are O(|logit|) and almost equal, and subtracting them as rounded fp32 numbers would
    # leave an error larger than the KL itself (the usual state early in training).
    lse_gap = (stats[M_S].to(wide) - stats[M_T].to(wide)) + torch.log(stats[Z_S].to(wide) / stats[Z_T].to(wide))
    # A KL is never negative; when the models agree to rounding the two terms cancel to +-1 ulp of
    # log V, so the value is clamped at 0. The backward is analytic and does not read these values.
    kl_reverse = (expected_diff.to(wide) - lse_gap).clamp_min(0.0).to(stats.dtype)
    kl_forward = ((stats[A_T] / stats[Z_T]).to(wide) + lse_gap).clamp_min(0.0).to(stats.dtype)
    return TokenOutputs(logp, log_prob(M_T, Z_T, Y_T), kl_forward, kl_reverse, lse, ref_lse, expected_diff)


def chunk_dlogits(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
    lse, ref_lse, expected_diff, grad_logp, grad_kl_forward, grad_kl_reverse, inv_tau, out_dtype,
    softcap: float | None = None,
) -> torch.Tensor:
    """PyTorch twin of ``csrc_triton.token_dlogits`` (same arguments, same formula): dS [n, v], the gradient
    w.r.t. the pre-cap logits ``h W^T + b`` (with ``softcap``, the formula of docs/design.md section 3 in the
    capped logits, times the tanh's slope)."""
    s = chunk_logits(hidden, weight, bias, inv_tau, softcap)
    v = s.shape[1]
    # With a cap the slope is taken before s turns into p: one more chunk-sized buffer.
    slope = None if softcap is None else softcap_slope(s, softcap * inv_tau)
    if ref_hidden is None:
        ds = s.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])  # -g_lp p, in the logits' storage
    else:
        # dS = p (g_r ((s - t) - E_p[s - t]) + g_f - g_lp) - g_f q  (+ g_lp at the target, below):
        # three chunk-sized buffers, the logits' two reused for p and q.
        t = chunk_logits(ref_hidden, ref_weight, ref_bias, inv_tau, softcap)
        ds = (s - t).sub_(expected_diff[:, None]).mul_(grad_kl_reverse[:, None])
        ds += (grad_kl_forward - grad_logp)[:, None]
        ds.mul_(s.sub_(lse[:, None]).exp_())
        ds.sub_(t.sub_(ref_lse[:, None]).exp_().mul_(grad_kl_forward[:, None]))
    in_chunk = (targets >= 0) & (targets < v)
    ds.scatter_add_(1, targets.clamp(0, v - 1)[:, None], torch.where(in_chunk, grad_logp, 0.0)[:, None])
    if slope is not None:
        ds.mul_(slope)
    return (ds if inv_tau == 1.0 else ds.mul_(inv_tau)).to(out_dtype)
