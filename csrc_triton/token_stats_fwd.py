"""Forward: per-token statistics of policy and reference logits, streamed over vocabulary tiles.

One program owns BLOCK_N tokens and one slice of the vocabulary. It walks that slice tile by tile with an
online max (as in flash attention) and keeps, per token and per model, the running max ``m``, the sum of
``exp(logit - m)``, the target logit and the KL accumulator ``A`` (DESIGN.md section 3). The partial
statistics of all slices are merged on the host side (``firempo_kernels.token_stats.merge_partials``).
"""

import torch
import triton
import triton.language as tl

from .configs import tile_config, vocab_splits
from .logits_tile import INTERPRETED, dot_precision, logits_tile

# Rows of the partial-statistics tensor [splits, NUM_STATS, N]; the reference rows stay unwritten
# when there is no reference.
M_S, Z_S, A_S, Y_S, M_T, Z_T, A_T, Y_T = range(8)
NUM_STATS = 8


@triton.jit
def _token_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, y_ptr, stats_ptr,
    N, V, D, RD, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    stride_split, stride_stat,
    inv_tau,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr,
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
                        stride_hn, stride_hd, stride_wv, stride_wd, inv_tau,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, PRECISION)
        y_s += tl.sum(tl.where(is_target, s, 0.0), axis=1)
        m_s_new = tl.maximum(m_s, tl.max(tl.where(v_mask[None, :], s, float("-inf")), axis=1))
        p = tl.where(v_mask[None, :], tl.exp(s - m_s_new[:, None]), 0.0)
        rescale_s = tl.exp(m_s - m_s_new)
        z_s = z_s * rescale_s + tl.sum(p, axis=1)
        m_s = m_s_new

        if HAS_REF:
            t = logits_tile(rh_ptr, rw_ptr, rb_ptr, offs_n, offs_v, n_mask, v_mask, RD,
                            stride_rhn, stride_rhd, stride_rwv, stride_rwd, inv_tau,
                            HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, REF_PRECISION)
            y_t += tl.sum(tl.where(is_target, t, 0.0), axis=1)
            m_t_new = tl.maximum(m_t, tl.max(tl.where(v_mask[None, :], t, float("-inf")), axis=1))
            q = tl.where(v_mask[None, :], tl.exp(t - m_t_new[:, None]), 0.0)
            rescale_t = tl.exp(m_t - m_t_new)
            z_t = z_t * rescale_t + tl.sum(q, axis=1)
            m_t = m_t_new
            # s - t, not s and t apart: the KL is a small difference of O(|logit|) terms.
            diff = s - t
            a_s = a_s * rescale_s + tl.sum(p * diff, axis=1)
            a_t = a_t * rescale_t - tl.sum(q * diff, axis=1)

    out = stats_ptr + pid_split * stride_split + offs_n
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
) -> torch.Tensor:
    """Launch the forward kernel. Returns partial statistics ``[splits, NUM_STATS, N]`` float32.

    ``hidden`` [N, d] and ``weight`` [V, d] share a dtype (fp32/bf16/fp16), any strides;
    ``ref_hidden`` [N, d'] / ``ref_weight`` [V, d'] likewise, or both None; ``targets`` [N] int64.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    has_ref = ref_hidden is not None
    cfg = tile_config("token_stats_fwd", n, hidden.dtype, hidden.device)
    row_blocks = triton.cdiv(n, cfg.block_n)
    vocab_tiles = triton.cdiv(v, cfg.block_v)
    splits = vocab_splits(row_blocks, vocab_tiles, hidden.device)
    vocab_per_split = triton.cdiv(vocab_tiles, splits) * cfg.block_v
    splits = triton.cdiv(v, vocab_per_split)  # every split owns at least one tile

    stats = torch.empty((splits, NUM_STATS, n), dtype=torch.float32, device=hidden.device)
    rh = ref_hidden if has_ref else hidden
    rw = ref_weight if has_ref else weight
    _token_stats_fwd_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight,
        rh, rw, ref_bias if ref_bias is not None else rw,
        targets, stats,
        n, v, d, rh.shape[1], vocab_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        rh.stride(0), rh.stride(1), rw.stride(0), rw.stride(1),
        stats.stride(0), stats.stride(1),
        inv_tau,
        HAS_BIAS=bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=ref_bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        UPCAST_DOT=INTERPRETED, PRECISION=dot_precision(hidden.dtype),
        REF_PRECISION=dot_precision(rh.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return stats
