"""The core fused ops against the float64 full-logits reference, on both backends."""

import math

import pytest
import torch
import triton
import triton.language as tl

import firempo_kernels as fk
from firempo_kernels import ops
from firempo_kernels.csrc_triton.logits_tile import tanh as kernel_tanh
from reference import full_logits, reference_token_kl, rel_err

# fp32: the statistics are sums of V terms in fp32, ~sqrt(V) * 2**-24 relative, far below these bounds;
# the gradients add one more fp32 product chain (dS @ W), hence the looser of the two.
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4


def make_inputs(n, vocab, d, *, ref_d=None, dtype=torch.float32, bias=False, lead=(), scale=1.0):
    ref_d = d if ref_d is None else ref_d
    shape = (*lead, n) if lead else (n,)
    hidden = torch.randn(*shape, d, dtype=dtype)
    weight = (torch.randn(vocab, d) * scale / d**0.5).to(dtype)
    ref_hidden = torch.randn(*shape, ref_d, dtype=dtype)
    ref_weight = (torch.randn(vocab, ref_d) * scale / ref_d**0.5).to(dtype)
    targets = torch.randint(0, vocab, shape)
    b = torch.randn(vocab, dtype=dtype) if bias else None
    rb = torch.randn(vocab, dtype=dtype) if bias else None
    return hidden, weight, ref_hidden, ref_weight, targets, b, rb


def upstream(shape):
    """Random upstream gradients for the three differentiable outputs."""
    return torch.randn(shape), torch.randn(shape), torch.randn(shape)


def check_token_kl(n, vocab, d, *, bias=False, temperature=1.0, ignore_frac=0.0, lead=(), ref_d=None,
                   freeze_weight=False, scale=1.0, softcap=None):
    h, w, rh, rw, y, b, rb = make_inputs(n, vocab, d, bias=bias, lead=lead, ref_d=ref_d, scale=scale)
    if ignore_frac:
        y[torch.rand(y.shape) < ignore_frac] = -100
    leaves = [h.requires_grad_()]
    if not freeze_weight:
        leaves.append(w.requires_grad_())
    if b is not None:
        leaves.append(b.requires_grad_())

    out = fk.fused_linear_token_kl(h, w, rh, rw, y, bias=b, ref_bias=rb, temperature=temperature, softcap=softcap)
    g_lp, g_f, g_r = upstream(y.shape)
    ((out.logp * g_lp).sum() + (out.kl_forward * g_f).sum() + (out.kl_reverse * g_r).sum()).backward()

    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    h64 = leaves64[0]
    w64 = w.detach().double() if freeze_weight else leaves64[1]
    b64 = leaves64[-1] if b is not None else None
    ref = reference_token_kl(h64, w64, y, rh.double(), rw.double(), bias=b64,
                             ref_bias=None if rb is None else rb.double(), temperature=temperature, softcap=softcap)
    ((ref[0] * g_lp).sum() + (ref[2] * g_f).sum() + (ref[3] * g_r).sum()).backward()

    for name, got, want in zip(out._fields, out, ref):
        assert got.dtype == torch.float32 and got.shape == y.shape
        assert rel_err(got, want) < VALUE_RTOL, name
    for x, x64 in zip(leaves, leaves64):
        assert rel_err(x.grad, x64.grad) < GRAD_RTOL
    if freeze_weight:
        assert w.grad is None
    return out, y


SHAPES = {
    "one-token": (1, 40, 16),  # V below one vocabulary block
    "odd": (37, 300, 48),  # V not a multiple of the block, d not a multiple of BLOCK_D
    "tall": (70, 130, 32),  # more than one row block
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_token_kl_matches_reference(backend, shape):
    check_token_kl(*shape)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_kl_bias_temperature(backend, bias, temperature):
    check_token_kl(21, 200, 24, bias=bias, temperature=temperature)


def test_token_kl_ignored_rows_are_zero_and_get_no_gradient(backend):
    out, y = check_token_kl(33, 150, 16, ignore_frac=0.4, lead=(2,))
    ignored = y == -100
    assert ignored.any()
    for value in out:
        assert torch.all(value[ignored] == 0)


def test_all_rows_ignored(backend):
    h, w, rh, rw, y, _, _ = make_inputs(5, 50, 16)
    y.fill_(-100)
    h.requires_grad_()
    w.requires_grad_()
    out = fk.fused_linear_token_kl(h, w, rh, rw, y)
    sum(o.sum() for o in out[:1] + out[2:]).backward()
    assert all(torch.all(o == 0) for o in out)
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_frozen_head_does_no_weight_gradient_work(backend, monkeypatch):
    products = []
    real = ops._accumulate_product
    monkeypatch.setattr(ops, "_accumulate_product", lambda out, a, b: (products.append(out.shape), real(out, a, b)))
    check_token_kl(19, 100, 16, freeze_weight=True)
    assert products and all(shape[0] == 19 for shape in products)  # only dh products, never [V, d]


def test_reference_with_its_own_width_and_no_graph(backend):
    check_token_kl(9, 64, 16, ref_d=24)
    h, w, rh, rw, y, _, _ = make_inputs(9, 64, 16)
    rh.requires_grad_()
    rw.requires_grad_()
    out = fk.fused_linear_token_kl(h.requires_grad_(), w, rh, rw, y)
    assert not out.ref_logp.requires_grad
    (out.logp.sum() + out.kl_forward.sum() + out.kl_reverse.sum()).backward()
    assert rh.grad is None and rw.grad is None


def test_large_logits_stay_finite(backend):
    out, _ = check_token_kl(12, 90, 16, scale=40.0)
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("output", ["logp", "kl_forward", "kl_reverse"])
def test_each_output_alone_carries_its_gradient(backend, output):
    h, w, rh, rw, y, _, _ = make_inputs(11, 70, 16)
    h.requires_grad_()
    getattr(fk.fused_linear_token_kl(h, w, rh, rw, y), output).sum().backward()
    h64 = h.detach().double().requires_grad_()
    ref = reference_token_kl(h64, w.double(), y, rh.double(), rw.double())
    ref[("logp", "ref_logp", "kl_forward", "kl_reverse").index(output)].sum().backward()
    assert rel_err(h.grad, h64.grad) < GRAD_RTOL


def test_identical_models_have_zero_kl(backend):
    h, w, _, _, y, _, _ = make_inputs(8, 77, 16)
    out = fk.fused_linear_token_kl(h, w, h, w, y)
    assert out.kl_forward.abs().max() < 1e-6 and out.kl_reverse.abs().max() < 1e-6
    assert torch.equal(out.logp, out.ref_logp)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("bias", [False, True])
def test_logprobs_matches_reference(backend, shape, bias):
    h, w, _, _, y, b, _ = make_inputs(*shape, bias=bias)
    y[0] = -100
    leaves = [h.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    logp = fk.fused_linear_logprobs(h, w, y, bias=b, temperature=1.3)
    g = torch.randn(y.shape)
    (logp * g).sum().backward()
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    ref = reference_token_kl(leaves64[0], leaves64[1], y, bias=leaves64[2] if bias else None, temperature=1.3)
    (ref * g).sum().backward()
    assert logp.dtype == torch.float32 and logp[0] == 0
    assert rel_err(logp, ref) < VALUE_RTOL
    for x, x64 in zip(leaves, leaves64):
        assert rel_err(x.grad, x64.grad) < GRAD_RTOL


def test_non_contiguous_inputs(backend):
    h, w, rh, rw, y, _, _ = make_inputs(20, 90, 32)
    h_nc = torch.randn(32, 20).T  # transposed view
    w_nc = torch.randn(90, 64)[:, ::2]  # strided columns
    y_nc = torch.randint(0, 90, (40,))[::2]
    got = fk.fused_linear_token_kl(h_nc, w_nc, rh.T.contiguous().T, rw, y_nc)
    want = fk.fused_linear_token_kl(h_nc.contiguous(), w_nc.contiguous(), rh.contiguous(), rw, y_nc.contiguous())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


def test_empty_input(backend):
    h, w, rh, rw, _, _, _ = make_inputs(0, 50, 16)
    y = torch.zeros(0, dtype=torch.long)
    h.requires_grad_()
    w.requires_grad_()
    out = fk.fused_linear_token_kl(h, w, rh, rw, y)
    assert all(o.shape == (0,) for o in out)
    (out.logp.sum() + out.kl_reverse.sum()).backward()
    assert h.grad.shape == h.shape and torch.all(w.grad == 0)
    assert fk.fused_linear_logprobs(h, w, y).shape == (0,)


# --------------------------------------------------------------------------------------------------
# Low precision: the error against the float64 truth of the same (rounded) inputs must be no worse than
# that of the eager same-dtype PyTorch computation, plus a small tolerance (2**-9, one bf16 ulp at 1).
# --------------------------------------------------------------------------------------------------
def eager_same_dtype(h, w, rh, rw, y, softcap=None):
    log_p = torch.log_softmax(full_logits(h, w, softcap=softcap), dim=-1)
    log_q = torch.log_softmax(full_logits(rh, rw, softcap=softcap), dim=-1)
    logp = log_p.gather(-1, y[:, None])[:, 0]
    return (logp, log_q.gather(-1, y[:, None])[:, 0],
            (log_q.exp() * (log_q - log_p)).sum(-1), (log_p.exp() * (log_p - log_q)).sum(-1))


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["uncapped", "capped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(backend, dtype, softcap):
    """With a cap, eager computes the tanh in the input dtype too (as a bf16 model does)."""
    h, w, rh, rw, y, _, _ = make_inputs(29, 260, 32, dtype=dtype, scale=4.0)
    g = upstream(y.shape)
    results = {}
    for name, fn in (("fused", lambda *a: fk.fused_linear_token_kl(*a, softcap=softcap)),
                     ("eager", lambda *a: eager_same_dtype(*a, softcap=softcap))):
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = fn(hh, ww, rh, rw, y)
        ((out[0] * g[0]).sum() + (out[2] * g[1]).sum() + (out[3] * g[2]).sum()).backward()
        results[name] = (out, hh.grad, ww.grad)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = reference_token_kl(h64, w64, y, rh.double(), rw.double(), softcap=softcap)
    ((ref[0] * g[0]).sum() + (ref[2] * g[1]).sum() + (ref[3] * g[2]).sum()).backward()
    tol = 2.0**-9
    fused, eager = results["fused"], results["eager"]
    for i in range(4):
        assert fused[0][i].dtype == torch.float32
        assert rel_err(fused[0][i], ref[i]) <= rel_err(eager[0][i], ref[i]) + tol
    assert rel_err(fused[1], h64.grad) <= rel_err(eager[1], h64.grad) + tol
    assert rel_err(fused[2], w64.grad) <= rel_err(eager[2], w64.grad) + tol


# --------------------------------------------------------------------------------------------------
# float64 gradcheck of the torch path (the Triton path has no float64).
# --------------------------------------------------------------------------------------------------
def test_gradcheck_torch_path(monkeypatch):
    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    h, w, rh, rw, y, b, rb = make_inputs(6, 23, 5, dtype=torch.float64, bias=True)
    y[2] = -100

    def fn(h, w, b):
        out = fk.fused_linear_token_kl(h, w, rh, rw, y, bias=b, ref_bias=rb, temperature=0.9)
        return out.logp, out.kl_forward, out.kl_reverse

    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    assert torch.autograd.gradcheck(
        lambda h, w: fk.fused_linear_logprobs(h, w, y), (h, w)
    )


# --------------------------------------------------------------------------------------------------
# Memory contract: no allocation of N x V elements, forward or backward, on the chunked path.
# --------------------------------------------------------------------------------------------------
def test_no_tokens_by_vocab_allocation(monkeypatch):
    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    n, vocab, d = 512, 8192, 32
    h, w, rh, rw, y, _, _ = make_inputs(n, vocab, d)
    h.requires_grad_()
    w.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fk.fused_linear_token_kl(h, w, rh, rw, y)
        (out.logp.sum() + out.kl_forward.sum() + out.kl_reverse.sum()).backward()
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < largest < n * vocab * 4 / 4  # a quarter of one fp32 N x V tensor at the very most


def test_torch_chunk_shapes():
    """2**18 elements on the CPU: 512 x 512 when there are 512 tokens, wider vocabulary chunks (at most 2048)
    for fewer tokens; 2048 x 2048 on a GPU."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ops.chunk_shape(5000, 32000, cpu) == (512, 512)
    assert ops.chunk_shape(256, 32000, cpu) == (256, 1024)
    assert ops.chunk_shape(16, 32000, cpu) == (16, 2048)
    assert ops.chunk_shape(16, 300, cpu) == (16, 300)
    assert ops.chunk_shape(5000, 32000, gpu) == (2048, 2048)


def test_several_chunks_in_both_directions(monkeypatch):
    """Token and vocabulary chunk boundaries of the chunked path at its default chunk shape."""
    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    n_chunk, v_chunk = ops.chunk_shape(1100, 5000, torch.device("cpu"))
    assert n_chunk < 1100 and v_chunk < 5000 and 1100 % n_chunk and 5000 % v_chunk  # ragged last chunks
    check_token_kl(1100, 5000, 16, bias=True)
    check_token_kl(1100, 5000, 16, freeze_weight=True)  # the forward's chunks in the backward too


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [40, 100], ids=["dW-in-one-product", "dW-summed-over-token-chunks"])
def test_triton_backward_across_chunks(monkeypatch, n):
    """Small chunks force several vocabulary chunks, and (n = 100) several token chunks."""
    monkeypatch.setenv("FIREMPO_BACKEND", "triton")
    monkeypatch.setattr(ops, "_TRITON_CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(ops, "_TRITON_VOCAB_CHUNK", (64, 256))
    n_chunk, v_chunk = ops.chunk_shape(n, 300, torch.device("cpu"), "triton")
    assert v_chunk < 300 and (n_chunk < n) == (n == 100)
    check_token_kl(n, 300, 16, bias=True)


def test_near_identical_models_kl_within_what_fp32_allows(backend):
    """Early in training the policy is the reference plus a little: the KL is tiny, and must not drown in
    the rounding of two nearly equal log-sum-exps (O(|logit|) each).

    The logits are made exact in fp32 (hidden states on a 2^-10 grid, head weights on a 2^-1 grid, so every
    partial dot product is an integer multiple of 2^-11 below 2^12 and any summation order gives the same
    logits): what is left is the KL's own arithmetic. Its per-token error is bounded by
    (log2 V + 4) u (1 + E_p|s - t| + E_q|s - t|), u = 2^-24: each of p, s - t and their product rounds once,
    the V-term sums add log2 V roundings, z's division and the float64 finalisation one more. Eager fp32
    ``log_softmax`` meets the same bound; subtracting two fp32 log-sum-exps does not (measured 40-300 u).
    """
    n, vocab, d = 16, 1000, 32
    u = 2.0**-24
    h_grid, w_grid = 2.0**-10, 0.5

    def on_grid(x, grid, bound):
        return (x / grid).round().clamp(-bound / grid, bound / grid) * grid

    h = on_grid(torch.randn(n, d), h_grid, 4.0)
    w = on_grid(torch.randn(vocab, d) * 30 / d**0.5, w_grid, 24.0)
    y = torch.randint(0, vocab, (n,))
    for eps in (1e-2, 1e-3):
        rh = on_grid(h + eps * torch.randn(n, d), h_grid, 4.0)
        s, t = h @ w.T, rh @ w.T
        assert torch.equal(s.double(), h.double() @ w.double().T)  # exact, as built
        assert torch.equal(t.double(), rh.double() @ w.double().T)
        out = fk.fused_linear_token_kl(h, w, rh, w, y)
        ref = reference_token_kl(h.double(), w.double(), y, rh.double(), w.double())

        log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        p, q = log_p.exp(), log_q.exp()
        diff = (s - t).abs()
        allowed = (math.ceil(math.log2(vocab)) + 4) * u * (1 + (p * diff).sum(-1) + (q * diff).sum(-1))
        eager = ((q * (log_q - log_p)).sum(-1), (p * (log_p - log_q)).sum(-1))
        lse_gap = torch.logsumexp(s, -1) - torch.logsumexp(t, -1)
        lse_subtracted = ((q * (t - s)).sum(-1) + lse_gap, (p * (s - t)).sum(-1) - lse_gap)
        for fused, eager_kl, subtracted, expected in zip(
            (out.kl_forward, out.kl_reverse), eager, lse_subtracted, (ref[2], ref[3])
        ):
            assert ((fused.double() - expected).abs() <= allowed).all()
            assert ((eager_kl.double() - expected).abs() <= allowed).all()
            assert ((subtracted.double() - expected).abs() > allowed).any()  # the bound sees the fault


def test_kl_is_never_negative_for_models_equal_to_rounding(backend):
    """The reference is the policy plus noise at the last bits of the hidden states: the true KL is ~1e-12,
    below the rounding of the two terms it is the difference of, which used to come out as -1e-7."""
    torch.manual_seed(int(torch.randint(0, 2**20, ())))
    n, vocab, d = 64, 3000, 32
    h = torch.randn(n, d)
    w = torch.randn(vocab, d) * 30 / d**0.5
    y = torch.randint(0, vocab, (n,))
    rh = h * (1 + 2e-7 * torch.randn(n, d))
    out = fk.fused_linear_token_kl(h, w, rh, w, y)
    assert (out.kl_forward >= 0).all() and (out.kl_reverse >= 0).all()
    assert out.kl_forward.max() < 1e-5 and out.kl_reverse.max() < 1e-5


def test_statistics_layout_is_shared():
    from firempo_kernels import csrc_triton, token_stats

    assert csrc_triton.NUM_STATS == token_stats.NUM_STATS


def test_vocabulary_split_fills_the_chip(monkeypatch):
    """On a GPU with 132 SMs: one program per SM for few tokens, no split for many, and no grid at all
    never divides by zero."""
    from firempo_kernels.csrc_triton import configs

    monkeypatch.setattr(configs, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    cuda = torch.device("cuda")
    assert configs.vocab_splits(1, 1187, cuda) == 132
    assert configs.vocab_splits(128, 1187, cuda) == 2
    assert configs.vocab_splits(1000, 1187, cuda) == 1
    assert configs.vocab_splits(0, 1187, cuda) == 132
    assert configs.vocab_splits(1, 5, cuda) == 5


@pytest.mark.interpreter
def test_triton_backend_runs_the_kernels(monkeypatch):
    from firempo_kernels import csrc_triton

    calls = []
    for name in ("token_stats_partials", "token_dlogits"):
        real = getattr(csrc_triton, name)
        monkeypatch.setattr(csrc_triton, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    monkeypatch.setenv("FIREMPO_BACKEND", "triton")
    check_token_kl(5, 70, 16)
    assert set(calls) == {"token_stats_partials", "token_dlogits"}


# --------------------------------------------------------------------------------------------------
# Frozen head: dh of rows without a KL gradient comes from E_p[w] gathered in the forward (torch path).
# --------------------------------------------------------------------------------------------------
def _rebuilt_rows(monkeypatch):
    """Rows whose logits the backward rebuilds (chunk_dlogits calls), as a list of row counts."""
    rows = []
    real = ops.chunk_dlogits
    monkeypatch.setattr(ops, "chunk_dlogits", lambda h, *a: (rows.append(h.shape[0]), real(h, *a))[1])
    return rows


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "capped"])
@pytest.mark.parametrize("kl_gradient_rows", [0, 45, 1000], ids=["none", "leading", "every"])
@pytest.mark.parametrize("kl_beyond", [False, True], ids=["as-promised", "kl-gradient-beyond-the-promise"])
def test_frozen_head_expectations(monkeypatch, kl_gradient_rows, kl_beyond, softcap):
    """Across token and vocabulary chunks, with ignored rows compacted away, a frozen bias and a
    temperature: the gradient equals the float64 one whichever rows get a KL gradient; only the promised
    rows are rebuilt, and a KL gradient beyond the promise still gets it right (every row rebuilt).
    With a cap (logits of standard deviation ~3, cap 2) the unrebuilt rows' dh comes from E_p[c w]."""
    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    monkeypatch.setattr(ops, "_TORCH_CHUNK_ELEMENTS", {"cpu": 1 << 12, "cuda": 1 << 12})
    monkeypatch.setattr(ops, "_TORCH_TOKEN_CHUNK", {"cpu": 32, "cuda": 32})
    rebuilt = _rebuilt_rows(monkeypatch)
    h, w, rh, rw, y, b, rb = make_inputs(90, 300, 16, bias=True, scale=3.0)
    y[torch.rand(y.shape) < 0.2] = -100
    y[:3] = -100
    h.requires_grad_()
    out = ops.token_kl_with_kl_rows(h, w, rh, rw, y, kl_gradient_rows, bias=b, ref_bias=rb, temperature=0.8,
                                    softcap=softcap)
    g_lp, g_f, g_r = upstream(y.shape)
    promised = torch.arange(90) < kl_gradient_rows
    if not kl_beyond:
        g_f, g_r = g_f * promised, g_r * promised
    ((out.logp * g_lp).sum() + (out.kl_forward * g_f).sum() + (out.kl_reverse * g_r).sum()).backward()

    h64 = h.detach().double().requires_grad_()
    ref = reference_token_kl(h64, w.double(), y, rh.double(), rw.double(), bias=b.double(), ref_bias=rb.double(),
                             temperature=0.8, softcap=softcap)
    ((ref[0] * g_lp).sum() + (ref[2] * g_f).sum() + (ref[3] * g_r).sum()).backward()
    for name, got, want in zip(out._fields, out, ref):
        assert rel_err(got, want) < VALUE_RTOL, name
    assert rel_err(h.grad, h64.grad) < GRAD_RTOL
    kept = int((y != -100).sum())
    promised_kept = int((y[:kl_gradient_rows] != -100).sum())
    expected = kept if kl_beyond and kl_gradient_rows < 90 else promised_kept
    # Every rebuilt row once per vocabulary chunk; the chunk's width follows the number of rebuilt rows
    # (128 entries for 32 rows or more, wider for fewer), which the random ignored rows make vary.
    vocab_chunks = -(-300 // ops.chunk_shape(expected, 300, torch.device("cpu"))[1]) if expected else 0
    assert sum(rebuilt) == expected * vocab_chunks


def test_frozen_head_logprobs_rebuild_nothing(monkeypatch):
    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    rebuilt = _rebuilt_rows(monkeypatch)
    h, w, _, _, y, b, _ = make_inputs(40, 3000, 16, bias=True)
    logp = fk.fused_linear_logprobs(h.requires_grad_(), w, y, bias=b)
    g = torch.randn(y.shape)
    (logp * g).sum().backward()
    h64 = h.detach().double().requires_grad_()
    (reference_token_kl(h64, w.double(), y, bias=b.double()) * g).sum().backward()
    assert rel_err(h.grad, h64.grad) < GRAD_RTOL and rebuilt == []


@pytest.mark.parametrize("tokens_per_chunk", [1024, 64], ids=["dW-in-one-product", "dW-summed-over-token-chunks"])
def test_weight_gradient_chunks(monkeypatch, tokens_per_chunk):
    """A trained head's backward walks token-major chunks (every product's inner dimension >= 256 at the
    default sizes): one token chunk, or several whose dW parts are summed."""
    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    monkeypatch.setattr(ops, "_TORCH_WEIGHT_GRADIENT_TOKENS", tokens_per_chunk)
    n_chunk, v_chunk = ops.chunk_shape(300, 5000, torch.device("cpu"), weight_gradient=True)
    assert v_chunk < 5000 and (n_chunk < 300) == (tokens_per_chunk == 64)
    check_token_kl(300, 5000, 16, bias=True)
    h, w, _, _, y, _, _ = make_inputs(300, 5000, 16)
    logp = fk.fused_linear_logprobs(h.requires_grad_(), w.requires_grad_(), y)
    g = torch.randn(y.shape)
    (logp * g).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (reference_token_kl(h64, w64, y) * g).sum().backward()
    assert rel_err(h.grad, h64.grad) < GRAD_RTOL and rel_err(w.grad, w64.grad) < GRAD_RTOL


# --------------------------------------------------------------------------------------------------
# Soft-capped logits: s = softcap * tanh((h W^T + b) / softcap) / tau for both models (Gemma 2's
# final_logit_softcapping). Logits of standard deviation ~4 against a cap of 2: most of them are bent.
# --------------------------------------------------------------------------------------------------
CAP, CAP_SCALE = 2.0, 4.0


@pytest.fixture
def small_chunks(monkeypatch):
    """Several token and vocabulary chunks on both paths, forward and backward, at test sizes."""
    monkeypatch.setattr(ops, "_TORCH_CHUNK_ELEMENTS", {"cpu": 1 << 11, "cuda": 1 << 11})
    monkeypatch.setattr(ops, "_TORCH_TOKEN_CHUNK", {"cpu": 16, "cuda": 16})
    monkeypatch.setattr(ops, "_TORCH_WEIGHT_GRADIENT_TOKENS", 16)
    monkeypatch.setattr(ops, "_TRITON_CHUNK_ELEMENTS", 1 << 11)
    monkeypatch.setattr(ops, "_TRITON_VOCAB_CHUNK", (64, 128))


def test_the_cap_matters_at_these_scales():
    """The capped tests below would pass an op that ignores the cap only if capping changed little."""
    h, w, rh, rw, y, b, rb = make_inputs(37, 300, 24, bias=True, scale=CAP_SCALE)
    capped = reference_token_kl(h.double(), w.double(), y, rh.double(), rw.double(), bias=b.double(),
                                ref_bias=rb.double(), softcap=CAP)
    plain = reference_token_kl(h.double(), w.double(), y, rh.double(), rw.double(), bias=b.double(),
                               ref_bias=rb.double())
    assert all(rel_err(p, c) > 0.3 for p, c in zip(plain, capped))


@pytest.mark.parametrize("freeze_weight", [False, True], ids=["trained-head", "frozen-head"])
def test_softcap_token_kl_matches_reference(backend, small_chunks, freeze_weight):
    """Values and gradients (hidden, weight, bias) of both KLs and the log-probs, with a temperature, a
    bias, ignored rows, odd sizes and several chunks each way."""
    n, vocab = 37, 300
    assert ops.chunk_shape(n, vocab, torch.device("cpu"), backend)[1] < vocab
    check_token_kl(n, vocab, 24, bias=True, temperature=0.7, ignore_frac=0.3, freeze_weight=freeze_weight,
                   scale=CAP_SCALE, softcap=CAP)


@pytest.mark.parametrize("freeze_weight", [False, True], ids=["trained-head", "frozen-head"])
def test_softcap_logprobs_matches_reference(backend, small_chunks, freeze_weight):
    h, w, _, _, y, b, _ = make_inputs(37, 300, 24, bias=True, scale=CAP_SCALE)
    y[torch.rand(y.shape) < 0.3] = -100
    leaves = [h.requires_grad_()] + ([] if freeze_weight else [w.requires_grad_(), b.requires_grad_()])
    logp = fk.fused_linear_logprobs(h, w, y, bias=b, temperature=1.3, softcap=CAP)
    g = torch.randn(y.shape)
    (logp * g).sum().backward()
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    w64, b64 = (w.double(), b.double()) if freeze_weight else leaves64[1:]
    (reference_token_kl(leaves64[0], w64, y, bias=b64, temperature=1.3, softcap=CAP) * g).sum().backward()
    assert rel_err(logp, reference_token_kl(h.double(), w.double(), y, bias=b.double(), temperature=1.3,
                                            softcap=CAP)) < VALUE_RTOL
    for x, x64 in zip(leaves, leaves64):
        assert rel_err(x.grad, x64.grad) < GRAD_RTOL


def test_softcap_gradcheck_torch_path(monkeypatch):
    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    h, w, rh, rw, y, b, rb = make_inputs(6, 23, 5, dtype=torch.float64, bias=True, scale=CAP_SCALE)
    y[2] = -100

    def fn(h, w, b):
        out = fk.fused_linear_token_kl(h, w, rh, rw, y, bias=b, ref_bias=rb, temperature=0.9, softcap=1.5)
        return out.logp, out.kl_forward, out.kl_reverse

    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    h.requires_grad_()  # the frozen-head path: dh from E_p[c w] gathered in the forward
    assert torch.autograd.gradcheck(lambda h: fk.fused_linear_logprobs(h, w, y, bias=b, softcap=1.5), (h,))


def test_huge_cap_is_no_cap(backend):
    """tanh(x) = x (1 - x^2 / 3 + ...): at |x| ~ 1e-5 the cap changes a logit by ~1e-10 of itself."""
    h, w, rh, rw, y, b, rb = make_inputs(9, 100, 16, bias=True)
    capped = fk.fused_linear_token_kl(h, w, rh, rw, y, bias=b, ref_bias=rb, softcap=1e6)
    plain = fk.fused_linear_token_kl(h, w, rh, rw, y, bias=b, ref_bias=rb)
    for a, p in zip(capped, plain):
        assert rel_err(a, p) < VALUE_RTOL


def test_no_cap_computes_no_tanh(monkeypatch):
    """``softcap=None`` adds nothing to the uncapped path: no tanh op on the torch path, and the kernels'
    SOFTCAP constexpr is off (their uncapped code is what it was before the cap existed)."""
    from firempo_kernels.csrc_triton.logits_tile import head_operands

    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    h, w, rh, rw, y, _, _ = make_inputs(20, 90, 16)
    h.requires_grad_()
    w.requires_grad_()

    def tanh_ops(softcap):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fk.fused_linear_token_kl(h, w, rh, rw, y, softcap=softcap)
            (out.logp.sum() + out.kl_forward.sum() + out.kl_reverse.sum()).backward()
        return sum(e.name.startswith("aten::tanh") for e in prof.events())

    assert tanh_ops(None) == 0 and tanh_ops(CAP) > 0
    assert head_operands(h, w, None, rh, rw, None)[2]["SOFTCAP"] is False
    assert head_operands(h, w, None, rh, rw, None, CAP)[2]["SOFTCAP"] is True


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, kernel_tanh(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


@pytest.mark.interpreter
def test_kernel_tanh_accuracy_in_fp32():
    """The kernels' tanh (from exp, no libdevice) against float64, under the interpreter.

    Bound, in units of u = 2**-24 relative to tanh(x): for |x| >= 0.25, e = exp(-2|x|) <= 0.61 carries one
    rounding (u e), which 1 - e >= 0.39 divides by at most 0.39: 1.6u; with the roundings of 1 - e, 1 + e
    and the quotient, at most ~5u. For |x| < 0.25 the series' truncation is below 0.2u and Horner's scheme
    on terms decreasing by x^2 / 3 <= 1/48 adds about one rounding per step: ~4u. So 6u, with margin.
    Exactly odd, exactly +-1 for large |x|, never beyond 1.
    """
    magnitudes = torch.cat([
        torch.logspace(-30, 2, 3000, dtype=torch.float64),
        torch.linspace(0.2, 0.3, 1001, dtype=torch.float64),  # across the series / exp boundary
        torch.rand(4000, dtype=torch.float64) * 10,
        torch.tensor([0.0, 0.25, 9.0, 20.0, 1e30, math.inf], dtype=torch.float64),
    ])
    x = torch.cat([magnitudes, -magnitudes]).float()
    out = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    want = torch.tanh(x.double())
    u = 2.0**-24
    rel = ((out.double() - want).abs() / want.abs().clamp_min(1e-300))[want != 0]
    assert rel.max() <= 6 * u, f"{rel.max() / u:.2f} u"
    half = magnitudes.numel()
    assert torch.equal(out[half:], -out[:half])
    assert out.abs().max() <= 1.0 and out[x.abs() > 9.1].abs().eq(1.0).all() and out[x == 0].eq(0).all()


def test_capped_launch_takes_its_own_tile_where_the_cap_would_spill(monkeypatch):
    """fp32 dlogits with 64-row tiles spills on sm_90 with a cap at the uncapped configuration; only the
    capped launch takes fewer pipeline stages (tests/test_compile.py holds every launch to zero spills)."""
    from firempo_kernels.csrc_triton import configs

    monkeypatch.setattr(configs, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    cuda = torch.device("cuda")
    uncapped = configs.tile_config("token_dlogits_bwd", 500, torch.float32, cuda)
    capped = configs.tile_config("token_dlogits_bwd", 500, torch.float32, cuda, softcap=True)
    assert (uncapped.num_stages, capped.num_stages) == (3, 2)
    assert (uncapped.block_n, uncapped.block_v, uncapped.block_d) == (capped.block_n, capped.block_v, capped.block_d)
    for dtype in (torch.bfloat16, torch.float16):
        assert configs.tile_config("token_stats_fwd", 8, dtype, cuda, True) == configs.tile_config(
            "token_stats_fwd", 8, dtype, cuda)


def test_softcap_saturated_logits(backend):
    """Logits of standard deviation 40 against a cap of 2: most of them are pressed to +-cap, many with
    tanh = +-1 exactly in fp32 (slope 0, as eager autograd has it); values and gradients stay finite and
    still meet the float64 reference."""
    out, _ = check_token_kl(12, 90, 16, bias=True, scale=40.0, softcap=CAP)
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("softcap", [None, CAP], ids=["uncapped", "capped"])
def test_empty_and_all_ignored_with_a_cap(backend, softcap):
    h, w, rh, rw, y, _, _ = make_inputs(5, 50, 16)
    for targets in (torch.full((5,), -100), torch.zeros(0, dtype=torch.long)):
        hh, ww = h[: targets.shape[0]].clone().requires_grad_(), w.clone().requires_grad_()
        out = fk.fused_linear_token_kl(hh, ww, rh[: targets.shape[0]], rw, targets, softcap=softcap)
        (out.logp.sum() + out.kl_forward.sum() + out.kl_reverse.sum()).backward()
        assert all(torch.all(o == 0) for o in out) and torch.all(hh.grad == 0) and torch.all(ww.grad == 0)
        hh = h[: targets.shape[0]].clone().requires_grad_()
        fk.fused_linear_logprobs(hh, w, targets, softcap=softcap).sum().backward()  # frozen-head path
        assert torch.all(hh.grad == 0)
