"""Backward: the gradient of the per-token outputs w.r.t. one chunk of policy logits, recomputed.

For token n and vocabulary entry j, with p = softmax(s), q = softmax(t) rebuilt from the saved
log-sum-exps and E_p[s - t] saved by the forward (docs/design.md section 3):

    dS[n, j] = ( g_lp (1[j = y] - p_j) + g_f (p_j - q_j) + g_r p_j ((s_j - t_j) - E_p[s - t]) ) / tau

With a soft cap c (s = c tanh(z / c) / tau, t likewise) that is the gradient w.r.t. the capped logits; the
kernel chains it to z = h W^T + b by the tanh's slope 1 - tanh^2(z / c), read back from s itself as
1 - (s tau / c)^2, so that no second tile stays live (docs/design.md section 8).

Each program rebuilds one (BLOCK_N x BLOCK_V) tile of s (and of t when a KL gradient is asked for) and
writes dS for it. The caller turns a chunk of dS into dh, dW and db with dense matrix products, so
nothing of size N x V exists at once.
"""

import torch
import triton
import triton.language as tl

from .configs import tile_config
from .logits_tile import INTERPRETED, head_operands, logits_tile, softcap_scalar


@triton.jit
def _token_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, y_ptr,
    lse_s_ptr, lse_t_ptr, e_diff_ptr, g_lp_ptr, g_f_ptr, g_r_ptr, ds_ptr,
    N, V, D, RD,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    stride_dsn, stride_dsv,
    inv_tau, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    v_mask = offs_v < V

    s = logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask, D,
                    stride_hn, stride_hd, stride_wv, stride_wd, inv_tau, softcap,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, PRECISION, SOFTCAP)
    y = tl.load(y_ptr + offs_n, mask=n_mask, other=-1)
    lse_s = tl.load(lse_s_ptr + offs_n, mask=n_mask, other=0.0)
    g_lp = tl.load(g_lp_ptr + offs_n, mask=n_mask, other=0.0)
    p = tl.exp(s - lse_s[:, None])
    ds = tl.where(offs_v[None, :] == y[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p

    if HAS_REF:
        t = logits_tile(rh_ptr, rw_ptr, rb_ptr, offs_n, offs_v, n_mask, v_mask, RD,
                        stride_rhn, stride_rhd, stride_rwv, stride_rwd, inv_tau, softcap,
                        HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, REF_PRECISION, SOFTCAP)
        lse_t = tl.load(lse_t_ptr + offs_n, mask=n_mask, other=0.0)
        e_diff = tl.load(e_diff_ptr + offs_n, mask=n_mask, other=0.0)
        g_f = tl.load(g_f_ptr + offs_n, mask=n_mask, other=0.0)
        g_r = tl.load(g_r_ptr + offs_n, mask=n_mask, other=0.0)
        q = tl.exp(t - lse_t[:, None])
        ds += g_f[:, None] * (p - q) + g_r[:, None] * p * ((s - t) - e_diff[:, None])

    ds = ds * inv_tau
    if SOFTCAP:
        r = s / (softcap * inv_tau)  # tanh(z / softcap), to a few ulp
        ds = ds * (1.0 - r * r)
    out = ds_ptr + offs_n[:, None] * stride_dsn + offs_v[None, :] * stride_dsv
    tl.store(out, ds.to(ds_ptr.dtype.element_ty), mask=n_mask[:, None] & v_mask[None, :])


def token_dlogits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ref_lse: torch.Tensor | None,
    expected_diff: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_kl_forward: torch.Tensor | None,
    grad_kl_reverse: torch.Tensor | None,
    inv_tau: float,
    out_dtype: torch.dtype,
    softcap: float | None = None,
) -> torch.Tensor:
    """dS [n, v] for one chunk: ``hidden`` [n, d], ``weight`` [v, d] (views are fine), ``targets`` [n]
    relative to the chunk's first vocabulary entry; per-token fp32 ``lse``, ``grad_*`` [n].

    The reference operands and ``ref_lse``, ``expected_diff``, ``grad_kl_*`` are all given (a KL
    gradient is wanted) or all None. ``softcap`` (> 0, or None): the logits are soft-capped, and dS is the
    gradient w.r.t. the pre-cap logits ``hidden @ weight.T + bias``. The result is ``out_dtype``; under the
    interpreter always fp32, since its fp32->bf16 cast truncates instead of rounding (the caller casts).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    has_ref = ref_hidden is not None
    cfg = tile_config("token_dlogits_bwd", n, hidden.dtype, hidden.device, softcap is not None)
    ds = torch.empty((n, v), dtype=torch.float32 if INTERPRETED else out_dtype, device=hidden.device)
    pointers, strides, constexprs = head_operands(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap)
    unused = lse  # stands in for the statistics a policy-only gradient never reads
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))
    _token_dlogits_kernel[grid](
        *pointers, targets,
        lse, ref_lse if has_ref else unused, expected_diff if has_ref else unused,
        grad_logp, grad_kl_forward if has_ref else unused, grad_kl_reverse if has_ref else unused,
        ds,
        n, v, d, pointers[3].shape[1],
        *strides, ds.stride(0), ds.stride(1),
        inv_tau, softcap_scalar(softcap),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
    )
    return ds
