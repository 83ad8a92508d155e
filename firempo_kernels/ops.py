"""The core fused ops (layer 2): target log-probs and two-sided token KL straight from hidden states.

    fused_linear_logprobs(hidden, weight, targets)                          -> Tensor
    fused_linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets)  -> TokenKL

Forward: per-token statistics streamed over the vocabulary (Triton kernel on CUDA, chunked PyTorch
elsewhere; see ``backend``). Backward: dS is recomputed chunk by chunk from the saved per-token
statistics and turned into dh, dW, db by dense matrix products. No tensor of N x V elements exists.
"""

from typing import NamedTuple

import torch

from . import _validate as v
from .backend import resolve_backend
from .token_stats import (
    M_S,
    NUM_STATS,
    Z_S,
    accumulation_dtype,
    chunk_dlogits,
    chunk_logits,
    chunk_stats,
    finalize,
    merge_partials,
)


class TokenKL(NamedTuple):
    """Per-token outputs of :func:`fused_linear_token_kl`, each shaped like ``targets``; float32 (float64
    for float64 inputs)."""

    logp: torch.Tensor  #: log pi_theta(y_t)
    ref_logp: torch.Tensor  #: log pi_ref(y_t); never receives a gradient
    kl_forward: torch.Tensor  #: KL(pi_ref || pi_theta) over the full vocabulary
    kl_reverse: torch.Tensor  #: KL(pi_theta || pi_ref) over the full vocabulary


# ---------------------------------------------------------------------------------------------------
# Chunking. The torch path's working memory is one (tokens x vocab) chunk of fp32 plus a handful of
# same-sized temporaries (logits, exp, dS; twice that with a reference). A 2**18-element chunk (1 MiB)
# keeps them near 8 MiB, a few percent of the full-logits path even at N=4096, V=32000. Its shape is
# 512 tokens x 512 vocabulary entries where there are that many tokens: a CPU BLAS runs the logits
# product [512, d] x [d, 512] about 1.35x as fast as [128, d] x [d, 2048] (benchmarks/TUNING.md section 4,
# item 7); fewer tokens widen the vocabulary chunk up to 2048 entries, past which the chunk leaves the
# cache. On a GPU (forced torch backend) 2**22 elements, 2048 x 2048, keep ~100 MiB of temporaries and the
# products at a useful size. Two more tensors on this path, both the size of the gradient dh: with a frozen
# head, E_p[W] (fp32 [N, d]) is kept from the forward to the backward (docs/design.md section 7); a trained
# head's backward walks 1024 x 256 chunks instead (same element budget; see chunk_shape).
# The Triton path's only chunk is dS (bf16), written by the kernel and read by two cuBLAS products:
# 2**26 elements (128 MiB). Its token chunk spans every token whenever it can (up to 65536), so each
# vocabulary chunk's dW comes from one product written straight into the gradient, with no fp32
# accumulation pass; vocabulary chunks of at most 32768 mean N x V is never materialised.
# ---------------------------------------------------------------------------------------------------
_TORCH_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 22}
_TORCH_TOKEN_CHUNK = {"cpu": 512, "cuda": 2048}
_TORCH_VOCAB_CHUNK = 2048  # most
_TORCH_WEIGHT_GRADIENT_TOKENS = 1024
_TRITON_CHUNK_ELEMENTS = 1 << 26
_TRITON_VOCAB_CHUNK = (1024, 32768)  # least, most


def chunk_shape(num_tokens: int, vocab: int, device: torch.device, backend: str = "torch",
                weight_gradient: bool = False) -> tuple[int, int]:
    """(tokens, vocabulary entries) per chunk for ``backend`` on ``device``; ``weight_gradient``: for a
    backward that produces dW."""
    if backend == "triton":
        least, most = _TRITON_VOCAB_CHUNK
        n_chunk = max(1, min(num_tokens, _TRITON_CHUNK_ELEMENTS // least))
        v_chunk = max(1, min(vocab, most, _TRITON_CHUNK_ELEMENTS // n_chunk))
        return n_chunk, v_chunk
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget = _TORCH_CHUNK_ELEMENTS[kind]
    if weight_gradient:
        # dW = dS^T h sums over tokens: its product's inner dimension is the token chunk. 1024 tokens x 256
        # vocabulary entries (the same 2**18 elements) make every product's inner dimension >= 256, and
        # up to 1024 tokens each vocabulary slice of dW is one product written in place.
        n_chunk = max(1, min(num_tokens, _TORCH_WEIGHT_GRADIENT_TOKENS))
        return n_chunk, max(1, min(vocab, budget // n_chunk))
    n_chunk = max(1, min(num_tokens, _TORCH_TOKEN_CHUNK[kind]))
    return n_chunk, max(1, min(vocab, _TORCH_VOCAB_CHUNK, budget // n_chunk))


def _stats_torch(h, w, b, rh, rw, rb, y, inv_tau, expect_from=None, softcap=None):
    """Merged statistics [NUM_STATS, n], and with ``expect_from`` (an int) E_p[w] [n - expect_from, d] for
    the rows from ``expect_from`` on (else None); with ``softcap``, E_p[(1 - tanh^2) w] (section 8)."""
    n, vocab = h.shape[0], w.shape[0]
    n_chunk, v_chunk = chunk_shape(n, vocab, h.device)
    acc = accumulation_dtype(h.dtype)
    stats = h.new_empty((NUM_STATS, n), dtype=acc)
    has_ref = rh is not None
    cap_scale = None if softcap is None else softcap * inv_tau
    expected_w = None if expect_from is None else h.new_zeros((n - expect_from, w.shape[1]), dtype=acc)
    for i in range(0, n, n_chunk):
        rows = slice(i, i + n_chunk)
        # This chunk's rows that gather E_p[w] (from `expect_from` on) sum it straight into expected_w.
        expected = None
        if expected_w is not None and expect_from < i + n_chunk:
            expected = expected_w[max(0, i - expect_from) : i + n_chunk - expect_from]
        running = None
        for j in range(0, vocab, v_chunk):
            cols = slice(j, j + v_chunk)
            s = chunk_logits(h[rows], w[cols], None if b is None else b[cols], inv_tau, softcap)
            t = None if not has_ref else chunk_logits(
                rh[rows], rw[cols], None if rb is None else rb[cols], inv_tau, softcap
            )
            # Each chunk's statistics are relative to the running maximum or above, so E_p[w]'s running
            # sum is rescaled in place and the merge leaves this chunk's share as it is.
            part = chunk_stats(s, t, y[rows] - j, None if expected is None else w[cols].to(acc), expected,
                               None if running is None else running[M_S], cap_scale)
            running = part if running is None else merge_partials(torch.stack((running, part)), has_ref)
        stats[:, rows] = running
        if expected is not None:
            expected.div_(running[Z_S, -expected.shape[0]:, None])
    return stats, expected_w


def _stats_triton(h, w, b, rh, rw, rb, y, inv_tau, softcap=None) -> torch.Tensor:
    from firempo_kernels.csrc_triton import token_stats_partials

    partials = token_stats_partials(h, w, b, rh, rw, rb, y, inv_tau, softcap=softcap)
    return merge_partials(partials, rh is not None)


def _dlogits_triton(*args, **kwargs) -> torch.Tensor:
    from firempo_kernels.csrc_triton import token_dlogits

    return token_dlogits(*args, **kwargs)


def _accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` with ``out`` in the accumulation dtype and a, b in the operand dtype."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        out.addmm_(a, b)
    else:  # bf16/fp16 operands on a GPU: tensor-core product, one rounding per chunk, fp32 sum
        out += (a @ b).to(out.dtype)


class _FusedTokenStats(torch.autograd.Function):
    """Inputs are already validated, compacted to non-ignored rows and 2-D."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, inv_tau, backend, kl_rows,
                softcap):
        has_ref = ref_hidden is not None
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        # With a frozen head, dh of a row without a KL gradient is g (w_y - E_p[w]): E_p[w] is gathered here
        # from the probabilities the forward has anyway, so the backward rebuilds no logits for those rows
        # (docs/design.md section 7). Rows [0, kl_rows) may get a KL gradient and are rebuilt as before.
        # With a cap the same holds for the chained rows: dh = g (c_y w_y - E_p[c w]) with c = 1 - tanh^2,
        # and c comes free from the capped logits the forward has; so the cap keeps this path rather than
        # falling back to the rebuild, at one more [rows, vocab] chunk buffer (docs/design.md section 8).
        n = hidden.shape[0]
        frozen_head = backend == "torch" and need_dh and not (need_dw or need_db)
        expect_from = kl_rows if frozen_head and kl_rows < n else None
        expected_w = None
        with torch.no_grad():
            if hidden.shape[0] == 0:  # no kernel launch for an empty grid
                stats = hidden.new_zeros((NUM_STATS, 0), dtype=accumulation_dtype(hidden.dtype))
            elif backend == "triton":
                stats = _stats_triton(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, inv_tau,
                                      softcap)
            else:
                stats, expected_w = _stats_torch(
                    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, inv_tau, expect_from, softcap
                )
            out = finalize(stats, has_ref)
        ctx.inv_tau, ctx.backend, ctx.has_ref, ctx.softcap = inv_tau, backend, has_ref, softcap
        ctx.save_for_backward(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
            out.lse, out.ref_lse, out.expected_diff, expected_w,
        )
        ctx.set_materialize_grads(False)
        if not has_ref:
            return out.logp
        ctx.mark_non_differentiable(out.ref_logp)
        return out.logp, out.ref_logp, out.kl_forward, out.kl_reverse

    @staticmethod
    def backward(ctx, grad_logp, *grad_rest):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse, ref_lse, e_diff, expected_w = (
            ctx.saved_tensors
        )
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        grad_kl_forward, grad_kl_reverse = grad_rest[1:] if ctx.has_ref else (None, None)
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = lse.dtype

        def dense(g):
            return torch.zeros_like(lse) if g is None else g.to(acc).contiguous()

        # The reference logits are rebuilt only for token chunks with a non-zero KL gradient (callers
        # that want the KL on a few tokens put those first).
        grad_logp = dense(grad_logp)
        kl_rows = None
        if ctx.has_ref and (grad_kl_forward is not None or grad_kl_reverse is not None):
            grad_kl_forward, grad_kl_reverse = dense(grad_kl_forward), dense(grad_kl_reverse)
            kl_rows = ((grad_kl_forward != 0) | (grad_kl_reverse != 0)).cpu()

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        no_grads = (None,) * 8  # targets, inv_tau, backend, kl_rows, softcap and the reference's three
        dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_dh else None
        # Rows [0, rebuilt) get dS from rebuilt logits; the rest, dh from E_p[w]. A KL gradient on a row
        # without E_p[w]'s KL companions (not promised by the caller) sends every row to the rebuild.
        rebuilt = n
        if expected_w is not None:
            first = n - expected_w.shape[0]
            if kl_rows is None or not bool(kl_rows[first:].any()):
                rebuilt = first
                w_y = weight.index_select(0, targets[first:]).to(acc)
                if ctx.softcap is not None:  # c_y = 1 - tanh^2(z_y / softcap), z_y = h . w_y + b_y
                    z_y = (hidden[first:].to(acc) * w_y).sum(dim=1)
                    if bias is not None:
                        z_y += bias.index_select(0, targets[first:]).to(acc)
                    w_y *= (1.0 - torch.tanh(z_y / ctx.softcap).square())[:, None]
                dh[first:] = w_y.sub_(expected_w)
                dh[first:] *= grad_logp[first:, None] * ctx.inv_tau

        triton_path = ctx.backend == "triton"
        n_chunk, v_chunk = chunk_shape(rebuilt, vocab, hidden.device, ctx.backend, weight_gradient=need_dw)
        # With every token in one chunk, each vocabulary slice of dW is a single product: it is written
        # straight into the gradient, in its own dtype, instead of being summed over token chunks in fp32.
        dw_in_one_product = n_chunk >= n
        dw = torch.zeros(weight.shape, dtype=weight.dtype if dw_in_one_product else acc,
                         device=weight.device) if need_dw else None
        db = torch.zeros(vocab, dtype=acc, device=weight.device) if need_db else None
        if rebuilt and (need_dh or need_dw or need_db):
            dlogits = _dlogits_triton if triton_path else chunk_dlogits
            operand_dtype = weight.dtype if triton_path else acc
            for j in range(0, vocab, v_chunk):
                cols = slice(j, j + v_chunk)
                w_j = weight[cols].to(operand_dtype)
                for i in range(0, rebuilt, n_chunk):
                    rows = slice(i, min(i + n_chunk, rebuilt))
                    need_ref = kl_rows is not None and bool(kl_rows[rows].any())
                    ds = dlogits(
                        hidden[rows], weight[cols], None if bias is None else bias[cols],
                        ref_hidden[rows] if need_ref else None,
                        ref_weight[cols] if need_ref else None,
                        ref_bias[cols] if need_ref and ref_bias is not None else None,
                        targets[rows] - j, lse[rows],
                        ref_lse[rows] if need_ref else None,
                        e_diff[rows] if need_ref else None,
                        grad_logp[rows],
                        grad_kl_forward[rows] if need_ref else None,
                        grad_kl_reverse[rows] if need_ref else None,
                        ctx.inv_tau, operand_dtype, ctx.softcap,
                    ).to(operand_dtype)
                    if need_dh:
                        _accumulate_product(dh[rows], ds, w_j)
                    if need_dw and dw_in_one_product:
                        dw[cols] = ds.T @ hidden[rows].to(operand_dtype)
                    elif need_dw:
                        _accumulate_product(dw[cols], ds.T, hidden[rows].to(operand_dtype))
                    if need_db:
                        db[cols] += ds.sum(dim=0, dtype=acc)

        return cast(dh, hidden), cast(dw, weight), cast(db, weight), *no_grads


def _flatten_and_compact(hidden, targets, ignore_index, *others):
    """2-D views of the non-ignored rows, their row index (None when every row is kept)."""
    flat_targets = targets.reshape(-1)
    keep = flat_targets != ignore_index
    flat = [x.reshape(-1, x.shape[-1]) if x is not None else None for x in (hidden, *others)]
    if bool(keep.all()):
        return flat, flat_targets.to(torch.int64).contiguous(), None
    index = torch.nonzero(keep)[:, 0]
    flat = [x.index_select(0, index) if x is not None else None for x in flat]
    return flat, flat_targets.index_select(0, index).to(torch.int64), index


def _expand(values: torch.Tensor, index, targets: torch.Tensor) -> torch.Tensor:
    """Scatter compacted per-token values back to ``targets.shape``, 0 at ignored positions."""
    if index is None:
        return values.reshape(targets.shape)
    full = values.new_zeros(targets.numel())
    return full.index_copy(0, index, values).reshape(targets.shape)


def _run(fn, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, temperature, ignore_index,
         kl_gradient_rows=None, softcap=None):
    """Validate, compact and apply. ``kl_gradient_rows``: only the first that many positions (of the
    flattened ``targets``) can receive a KL gradient; None: any of them."""
    v.check_tensor(fn, "targets", targets)
    v.check_head(fn, "weight", weight, "bias", bias)
    v.check_hidden(fn, "hidden", hidden, "weight", weight, targets)
    has_ref = ref_weight is not None
    if has_ref:
        v.check_head(fn, "ref_weight", ref_weight, "ref_bias", ref_bias)
        v.check_hidden(fn, "ref_hidden", ref_hidden, "ref_weight", ref_weight, targets)
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{fn}: `ref_weight` must have the vocabulary size of `weight` ({weight.shape[0]}); "
                f"got {ref_weight.shape[0]}"
            )
    device = v.check_same_device(fn, {
        "hidden": hidden, "weight": weight, "bias": bias, "ref_hidden": ref_hidden,
        "ref_weight": ref_weight, "ref_bias": ref_bias, "targets": targets,
    })
    inv_tau = 1.0 / v.check_temperature(fn, temperature)
    softcap = v.check_softcap(fn, softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: `ignore_index` must be an int; got {type(ignore_index).__name__}")
    v.check_targets(fn, "targets", targets, weight.shape[0], ignore_index)
    backend = resolve_backend(device, hidden.dtype, *((ref_hidden.dtype,) if has_ref else ()))
    if has_ref:
        # The reference never gets a gradient: cut its graph so nothing of it is kept alive.
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = ref_bias.detach() if ref_bias is not None else None

    (h, rh), y, index = _flatten_and_compact(hidden, targets, ignore_index, ref_hidden)
    if not has_ref:
        kl_rows = 0
    elif kl_gradient_rows is None:
        kl_rows = y.shape[0]
    else:
        kl_rows = kl_gradient_rows if index is None else int((index < kl_gradient_rows).sum())
    outs = _FusedTokenStats.apply(h, weight, bias, rh, ref_weight, ref_bias, y, inv_tau, backend, kl_rows, softcap)
    outs = outs if has_ref else (outs,)
    return [_expand(o, index, targets) for o in outs]


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Log-probability of each target under ``softmax((hidden @ weight.T + bias) / temperature)``, or with
    ``softcap`` under ``softmax(softcap * tanh((hidden @ weight.T + bias) / softcap) / temperature)``.

    Args:
        hidden: [..., d] float32/bfloat16/float16 (float64 on the torch backend).
        weight: [V, d], the dtype of ``hidden``. Gets a gradient only if it requires one.
        targets: [...] integer, in [0, V) or ``ignore_index``.
        bias: optional [V], the dtype of ``weight``.
        temperature: in [1e-6, 1e6]; the logits are divided by it.
        ignore_index: positions with this target give 0 and receive no gradient.
        softcap: None (no cap, nothing computed for it), or a float in [1e-6, 1e6]: the logits are
            soft-capped to (-softcap, softcap) before the temperature, as models with
            ``config.final_logit_softcapping`` (Gemma 2, PaliGemma 2, Gemma 3n) compute theirs.

    Returns:
        float32 tensor shaped like ``targets`` (float64 for float64 inputs).
    """
    (logp,) = _run("fused_linear_logprobs", hidden, weight, bias, None, None, None, targets, temperature, ignore_index,
                   softcap=softcap)
    return logp


def fused_linear_token_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> TokenKL:
    """Target log-probs of policy and reference and both token-wise KL directions, without logits.

    With s = (hidden @ weight.T + bias) / T, t = (ref_hidden @ ref_weight.T + ref_bias) / T (with
    ``softcap`` = c: s = c tanh((hidden @ weight.T + bias) / c) / T and t likewise, the same cap for both),
    p = softmax(s), q = softmax(t), per position:
    ``logp = log p[y]``, ``ref_logp = log q[y]``, ``kl_forward = KL(q || p)``, ``kl_reverse = KL(p || q)``,
    both KLs over the full vocabulary.

    Args:
        hidden: [..., d] policy hidden states, float32/bfloat16/float16 (float64 on the torch backend).
        weight: [V, d] policy head, the dtype of ``hidden``.
        ref_hidden: [..., d'] reference hidden states (leading dims of ``targets``).
        ref_weight: [V, d'] reference head (may be ``weight`` itself), the dtype of ``ref_hidden``.
        targets: [...] integer, in [0, V) or ``ignore_index``.
        bias, ref_bias: optional [V].
        temperature: in [1e-6, 1e6], applied to both models' logits.
        ignore_index: positions with this target give 0 everywhere and receive no gradient.
        softcap: None (no cap, nothing computed for it), or a float in [1e-6, 1e6] applied to both models'
            logits before the temperature (``config.final_logit_softcapping``); both KLs are then of the
            capped distributions and the gradients chain through the tanh.

    Returns:
        :class:`TokenKL` of four float32 tensors shaped like ``targets``. Gradients reach ``hidden``,
        ``weight`` and ``bias`` (those that require grad) from any mix of ``logp``, ``kl_forward`` and
        ``kl_reverse``; the reference side never gets one and its graph is not kept.
    """
    return token_kl_with_kl_rows(
        hidden, weight, ref_hidden, ref_weight, targets, None,
        bias=bias, ref_bias=ref_bias, temperature=temperature, ignore_index=ignore_index, softcap=softcap,
    )


def token_kl_with_kl_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    kl_gradient_rows: int | None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    fn: str = "fused_linear_token_kl",
) -> TokenKL:
    """:func:`fused_linear_token_kl` (same arguments, shapes and dtypes) for a caller that knows that only
    the first ``kl_gradient_rows`` positions of the flattened ``targets`` can get a KL gradient (None: any):
    with a frozen head the forward then gathers the KL's backward terms for those rows only. A KL gradient
    elsewhere is still right, at the cost of rebuilding the logits in the backward. ``fn`` names the caller
    in error messages."""
    v.check_tensor(fn, "ref_weight", ref_weight)
    v.check_tensor(fn, "ref_hidden", ref_hidden)
    outs = _run(fn, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, temperature, ignore_index,
                kl_gradient_rows, softcap)
    return TokenKL(*outs)
