"""Forward: per-token statistics of policy and reference logits, streamed over vocabulary tiles.

One program owns BLOCK_N tokens and one slice of the vocabulary. It walks that slice tile by tile with an
online max (as in flash attention) and keeps, per token and per model, the running max ``m``, the sum of
``exp(logit - m)``, the target logit and the KL accumulator ``A`` (docs/design.md section 3). The partial
statistics of all slices are merged on the host side (``firempo_kernels.token_stats.merge_partials``).
With ``SOFTCAP`` every logit is capped in the tile (``logits_tile``) before any statistic sees it, so the
statistics are those of the capped distributions.
"""

import torch
import triton
import triton.language as tl

from .configs import tile_config, vocab_splits
from .logits_tile import head_operands, logits_tile, softcap_scalar

# Rows of the partial-statistics tensor [splits, NUM_STATS, N], in the layout of
# firempo_kernels.token_stats: m, z, A, target logit for the policy, then for the reference (left
# unwritten when there is none).
NUM_STATS = 8


@triton.jit
def _online_logsumexp_step(x, v_mask, is_target, m, z, target_logit):
    """Fold one tile of logits into the running max ``m``, sum ``z`` and target logit.

    Returns them with the tile's ``exp(x - m_new)`` (0 outside the vocabulary) and the factor by which
    sums over earlier tiles must be rescaled.
    """
    target_logit += tl.sum(tl.where(is_target, x, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(tl.where(v_mask[None, :], x, float("-inf")), axis=1))
    e = tl.where(v_mask[None, :], tl.exp(x - m_new[:, None]), 0.0)
    rescale = tl.exp(m - m_new)
    return m_new, z * rescale + tl.sum(e, axis=1), target_logit, e, rescale


@triton.jit
def _token_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, y_ptr, stats_ptr,
    N, V, D, RD, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    stride_split, stride_stat,
    inv_tau, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=n_mask, other=-1)

    v_begin = pid_split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)

    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    z_s = tl.zeros((BLOCK_N,), tl.float32)
    a_s = tl.zeros((BLOCK_N,), tl.float32)
    y_s = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    z_t = tl.zeros((BLOCK_N,), tl.float32)
    a_t = tl.zeros((BLOCK_N,), tl.float32)
    y_t = tl.zeros((BLOCK_N,), tl.float32)

    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = offs_v < v_end
        is_target = offs_v[None, :] == y[:, None]

        s = logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask, D,
                        stride_hn, stride_hd, stride_wv, stride_wd, inv_tau, softcap,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, PRECISION, SOFTCAP)
        m_s, z_s, y_s, p, rescale_s = _online_logsumexp_step(s, v_mask, is_target, m_s, z_s, y_s)

        if HAS_REF:
            t = logits_tile(rh_ptr, rw_ptr, rb_ptr, offs_n, offs_v, n_mask, v_mask, RD,
                            stride_rhn, stride_rhd, stride_rwv, stride_rwd, inv_tau, softcap,
                            HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, REF_PRECISION, SOFTCAP)
            m_t, z_t, y_t, q, rescale_t = _online_logsumexp_step(t, v_mask, is_target, m_t, z_t, y_t)
            # s - t, not s and t apart: the KL is a small difference of O(|logit|) terms.
            diff = s - t
            a_s = a_s * rescale_s + tl.sum(p * diff, axis=1)
            a_t = a_t * rescale_t - tl.sum(q * diff, axis=1)

    out = stats_ptr + pid_split.to(tl.int64) * stride_split + offs_n
    tl.store(out + 0 * stride_stat, m_s, mask=n_mask)
    tl.store(out + 1 * stride_stat, z_s, mask=n_mask)
    tl.store(out + 2 * stride_stat, a_s, mask=n_mask)
    tl.store(out + 3 * stride_stat, y_s, mask=n_mask)
    if HAS_REF:
        tl.store(out + 4 * stride_stat, m_t, mask=n_mask)
        tl.store(out + 5 * stride_stat, z_t, mask=n_mask)
        tl.store(out + 6 * stride_stat, a_t, mask=n_mask)
        tl.store(out + 7 * stride_stat, y_t, mask=n_mask)


def token_stats_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_tau: float,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """Launch the forward kernel. Returns partial statistics ``[splits, NUM_STATS, N]`` float32.

    ``hidden`` [N, d] and ``weight`` [V, d] share a dtype (fp32/bf16/fp16), any strides;
    ``ref_hidden`` [N, d'] / ``ref_weight`` [V, d'] likewise, or both None; ``targets`` [N] int64.
    ``softcap`` (> 0, or None): both models' logits are ``softcap * tanh(z / softcap) * inv_tau``.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = tile_config("token_stats_fwd", n, hidden.dtype, hidden.device, softcap is not None)
    row_blocks = triton.cdiv(n, cfg.block_n)
    vocab_tiles = triton.cdiv(v, cfg.block_v)
    splits = vocab_splits(row_blocks, vocab_tiles, hidden.device)
    vocab_per_split = triton.cdiv(vocab_tiles, splits) * cfg.block_v
    splits = triton.cdiv(v, vocab_per_split)  # every split owns at least one tile

    stats = torch.empty((splits, NUM_STATS, n), dtype=torch.float32, device=hidden.device)
    pointers, strides, constexprs = head_operands(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap)
    _token_stats_fwd_kernel[(row_blocks, splits)](
        *pointers, targets, stats,
        n, v, d, pointers[3].shape[1], vocab_per_split,
        *strides, stats.stride(0), stats.stride(1),
        inv_tau, softcap_scalar(softcap),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
    )
    return stats
