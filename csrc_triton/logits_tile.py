"""The one tile every kernel starts from: ``(x[rows] @ w[cols]^T + b[cols]) / tau`` in fp32, or with a
soft cap c, ``c * tanh((x[rows] @ w[cols]^T + b[cols]) / c) / tau``; and the tanh it needs."""

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 a bf16/fp16 ``tl.dot`` returns garbage, so the launch helpers ask for fp32
# operands there; on a GPU the operands stay in their own dtype and the dot accumulates in fp32.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype) -> str:
    """fp32 operands get exact fp32 products ("ieee"); Triton would otherwise use tf32 (~3e-4 error)."""
    return "ieee" if str(dtype).endswith("float32") else "tf32"


def head_operands(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap=None):
    """The operand arguments every kernel takes: six pointers, eight strides, and the matching constexprs
    (``SOFTCAP``: whether ``softcap`` is a float; the kernels take its value as the runtime scalar
    :func:`softcap_scalar` gives).

    Absent operands are stood in for by present ones of the same dtype; the constexpr flags keep the
    kernel from reading them.
    """
    has_ref = ref_hidden is not None
    rh = ref_hidden if has_ref else hidden
    rw = ref_weight if has_ref else weight
    pointers = (hidden, weight, weight if bias is None else bias, rh, rw, rw if ref_bias is None else ref_bias)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
               rh.stride(0), rh.stride(1), rw.stride(0), rw.stride(1))
    constexprs = dict(
        HAS_BIAS=bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=ref_bias is not None, SOFTCAP=softcap is not None,
        UPCAST_DOT=INTERPRETED, PRECISION=dot_precision(hidden.dtype), REF_PRECISION=dot_precision(rh.dtype),
    )
    return pointers, strides, constexprs


def softcap_scalar(softcap: float | None) -> float:
    """The kernels' runtime ``softcap`` argument: the cap, or 1.0 (unread: ``SOFTCAP`` is False) for none."""
    return 1.0 if softcap is None else float(softcap)


@triton.jit
def tanh(x):
    """fp32 tanh from ``exp`` alone (libdevice is unavailable under the interpreter).

    ``sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` <= 1: nothing overflows, and large |x| give
    exactly +-1. Below |x| = 0.25 that form loses relative accuracy (1 - e cancels: e's rounding is
    divided by 1 - e ~ 2|x|), so the odd Taylor series to x^9 takes over; its first omitted term,
    1382/155925 x^11, is below 2**-26 |x| there. Odd by construction.
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    by_exp = (1.0 - e) / (1.0 + e)
    a2 = tl.minimum(a, 0.25) * tl.minimum(a, 0.25)  # the unused branch stays finite for huge |x|
    by_series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, by_series, by_exp)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr,
    offs_rows, offs_cols, row_mask, col_mask,
    D, stride_xn, stride_xd, stride_wv, stride_wd, inv_tau, softcap,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # offs_rows / offs_cols are int64: rows * stride and cols * stride pass 2**31 at real sizes.
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(
            x_ptr + offs_rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
            mask=row_mask[:, None] & d_mask[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_cols[:, None] * stride_wv + offs_d[None, :] * stride_wd,
            mask=col_mask[:, None] & d_mask[None, :], other=0.0,
        )
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    if SOFTCAP:  # cap and temperature as one scale after the tanh
        return tanh(acc / softcap) * (softcap * inv_tau)
    return acc * inv_tau
