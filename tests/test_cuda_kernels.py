"""The compiled Triton kernels on a CUDA device against the float64 reference of tests/reference.py.

Each case runs ``fused_linear_token_kl`` (policy with a bias, and a reference model) or
``fused_linear_logprobs`` forward and backward with random upstream gradients on every output, and compares
values and gradients with float64 autograd over full logits. The cases span fp32 and bf16; the real
vocabularies 151,936 and 262,144; soft-capped and plain logits; a trained head (dW, db) and a frozen one
(no weight gradient work); and the forward's two launch regimes, checked from the launch itself: few tokens
(13 or 29, the 16- and 32-row tiles), where programs split the vocabulary of one row block between them, and
many tokens (64-row tiles), where each program streams the whole vocabulary for its rows (``tiled``). Eight
cases cover every pair of these levels.

Where there is no CUDA device the ``cuda`` cases skip, saying so. The ``cpu`` parameter runs the same cases
on CPU tensors through the Triton interpreter at small shapes, so this code is itself tested on every
machine; on a CUDA machine the interpreter is off (tests/conftest.py) and those skip instead.
``benchmarks/gpu_check.py`` runs :func:`run_case` for its correctness stage.

Tolerances. The kernels do the products eager PyTorch does, on the same operands, with fp32 accumulation,
but in other orders, with an online log-sum-exp (a rescale per vocabulary tile, a merge across splits),
probabilities rebuilt as exp(s - lse) from that separately rounded lse (on NVIDIA GPUs with Triton's fast
fp32 exp, an approximate exp2 after a multiply by log2(e)), and, for bf16, with logits kept in fp32 where an
eager bf16 model rounds them to bf16. So each error is judged against the
same-dtype eager computation's own error against float64 (``reference_outputs`` with
``softmax_dtype=float32``), the yardstick Cut Cross-Entropy's tests use too (eager's error against a more
precise result), here as maxima over each output and gradient:

    max |op - float64| <= 4 max |eager - float64| + u S,

u the unit roundoff of the output's dtype (2^-24 for the fp32 values, 2^-24 or 2^-8 for the gradients,
which come in the operands' dtype). The factor: per element, the extra roundings above make the kernels'
roundoff in the probabilities, and so in dS and every gradient, up to two to three times eager's, and a
maximum over a few hundred elements fluctuates by tens of percent more (measured under the interpreter over
60 random small fp32 cases: at most 2.3x eager's maximum error, in dW; under this rule 80 more reached at
most 0.43 of their limit; bf16 values are far below eager's, whose bf16 logits dominate). u S is the rounding no implementation avoids, so that the limit never reaches
zero where eager happens to be exact: S is the largest |float64| of a gradient, and for every value the
largest |log-probability| of the case, since the KLs are sums of differences of log-probabilities whose
roundoff scales with them, not with the (small) KL. A wrong index, mask, scale or cap moves some element by
O(1), orders of magnitude past the limit; in fp32 a relative slip of 1e-4 in dS fails (tested below), and
the bf16 cases, whose eager error is about 2^-8 relative, catch what fp32 arithmetic cannot show: the
operand loads and the dS store in 16 bits. Ignored positions must be exactly zero, in the values and in
their rows of the hidden-state gradient.
"""

import dataclasses
import math
import time
from contextlib import ExitStack
from unittest import mock

import pytest
import torch

from reference import reference_outputs

IGNORE = -100
EAGER_FACTOR = 4  # see the module docstring
# The rounding of an exact result to the output's dtype: half a unit in the last place, relative.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Outputs that carry an upstream gradient; ref_logp is a value only.
DIFFERENTIABLE = ("logp", "kl_forward", "kl_reverse")
# Per float64 [rows, V] of the reference: the graph keeps about a dozen of them alive at once.
REFERENCE_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 22}


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One correctness case. ``tokens`` None: many for the device (:func:`case_tokens`); ``regime`` None: no
    expectation about the launch (shape sweeps)."""

    op: str  # "token_kl" (policy with a bias, and a reference model) or "logprobs"
    dtype: str  # "float32" or "bfloat16"
    vocab: int
    dim: int
    head: str  # "trained" (dW, and db where there is a bias) or "frozen"
    softcap: float | None = None
    regime: str | None = None  # "split", "tiled" or None
    tokens: int | None = None

    @property
    def name(self) -> str:
        cap = "capped" if self.softcap is not None else "uncapped"
        tokens = f"N{self.tokens}-" if self.tokens is not None else ""
        return f"{self.op}-{self.dtype}-V{self.vocab}-d{self.dim}-{tokens}{self.head}-{cap}-{self.regime or 'any'}"


# The logits have standard deviation 2 (below); a cap of 4 bends them well away from linear: 4 tanh(s / 4)
# is 8% below s at one standard deviation, 24% at two.
SOFTCAP = 4.0


def _cases() -> list[KernelCase]:
    """Eight cases covering every pair of levels of the six factors: (dtype, head, regime) in full, the
    others as exclusive-ors of them."""
    cases = []
    for bf16 in (0, 1):
        for frozen in (0, 1):
            for tiled in (0, 1):
                capped = frozen ^ tiled
                big_vocab = bf16 ^ frozen ^ tiled
                logprobs = bf16 ^ frozen
                cases.append(KernelCase(
                    op="logprobs" if logprobs else "token_kl",
                    dtype="bfloat16" if bf16 else "float32",
                    vocab=262144 if big_vocab else 151936,
                    dim=2560 if big_vocab else 3584,
                    head="frozen" if frozen else "trained",
                    softcap=SOFTCAP if capped else None,
                    regime="tiled" if tiled else "split",
                    # Few tokens take the 16- and 32-row tiles (many take the 64-row ones), in each dtype.
                    tokens=None if tiled else (13 if bf16 == frozen else 29),
                ))
    return cases


CASES = _cases()


def case_tokens(case: KernelCase, device: torch.device) -> int:
    """N for ``case`` on ``device``: its own ``tokens``, else many for the device.

    Ragged on purpose: the last row block is partly masked. On CUDA the count leaves at least one 64-row
    block per SM once every 17th row, ignored, is compacted away (16/17 of 68 rows per SM), so no program
    splits the vocabulary; on CPU (the interpreter, 16-row blocks) it is 40 rows, 37 kept, in three blocks.
    """
    if case.tokens is not None:
        return case.tokens
    if device.type == "cuda":
        return 68 * torch.cuda.get_device_properties(device).multi_processor_count + 37
    return 40


def small(case: KernelCase) -> KernelCase:
    """The same case at CPU-interpreter sizes: V = 300 (ragged over 64-wide tiles), d = 40 (ragged over
    32-wide steps)."""
    return dataclasses.replace(case, vocab=300, dim=40)


def poison_cuda_cache(device: torch.device, max_bytes: int = 16 << 30) -> None:
    """Fill memory the caching allocator hands out next with 0xFF bytes (NaN in fp32 and bf16), so that an
    output element a kernel forgets to write is NaN, not a stale plausible number. No-op off CUDA."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    blob = torch.empty(min(max_bytes, free // 2), dtype=torch.uint8, device=device)
    blob.fill_(0xFF)
    del blob  # stays reserved in the cache, NaN-filled


def _inputs(case: KernelCase, n: int, device: torch.device, gen: torch.Generator) -> dict:
    """Operands drawn in fp32 and rounded to the case's dtype: logits of standard deviation 2, a reference
    model near the policy (KL of order 0.1 to 1), a target ignored every 17 rows, upstream gradients on
    every differentiable output."""
    kl = case.op == "token_kl"
    d, v = case.dim, case.vocab
    dtype = getattr(torch, case.dtype)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device) * scale

    std = 2.0 / math.sqrt(d)
    h = rnd(n, d)
    w = rnd(v, d, scale=std)
    x = {"hidden": h, "weight": w, "bias": rnd(v, scale=0.5) if kl else None,
         "ref_hidden": h + 0.3 * rnd(n, d) if kl else None, "ref_weight": w + 0.1 * rnd(v, d, scale=std) if kl else None}
    x["ref_bias"] = x["bias"] + 0.1 * rnd(v, scale=0.5) if kl else None
    x = {k: None if t is None else t.to(dtype) for k, t in x.items()}
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    y[::17] = IGNORE
    x["targets"] = y
    x["upstream"] = {k: rnd(n) for k in (DIFFERENTIABLE if kl else ("logp",))}
    return x


def _run_op(case: KernelCase, x: dict, temperature: float) -> tuple[dict, dict, list[int]]:
    """The fused op forward and backward under ``FIREMPO_BACKEND=triton``: (values, grads, the split
    counts of its forward launches)."""
    import firempo_kernels as fk
    from firempo_kernels import csrc_triton

    trains = case.head == "trained"
    h = x["hidden"].detach().requires_grad_()
    w = x["weight"].detach().requires_grad_(trains)
    b = None if x["bias"] is None else x["bias"].detach().requires_grad_(trains)
    splits = []
    real = csrc_triton.token_stats_partials

    def spy(*args, **kwargs):
        partials = real(*args, **kwargs)  # [splits, NUM_STATS, N]
        splits.append(partials.shape[0])
        return partials

    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict("os.environ", {"FIREMPO_BACKEND": "triton"}))
        stack.enter_context(mock.patch.object(csrc_triton, "token_stats_partials", spy))
        if case.regime == "tiled" and x["hidden"].device.type != "cuda":
            # The interpreter's policy always splits (so that the merge is tested): force the tiled launch.
            from firempo_kernels.csrc_triton import token_stats_fwd

            stack.enter_context(mock.patch.object(token_stats_fwd, "vocab_splits", lambda *a: 1))
        poison_cuda_cache(h.device)
        if case.op == "token_kl":
            out = fk.fused_linear_token_kl(h, w, x["ref_hidden"], x["ref_weight"], x["targets"], bias=b,
                                           ref_bias=x["ref_bias"], temperature=temperature, softcap=case.softcap)
            values = out._asdict()
        else:
            values = {"logp": fk.fused_linear_logprobs(h, w, x["targets"], temperature=temperature,
                                                       softcap=case.softcap)}
        sum((g * values[k]).sum() for k, g in x["upstream"].items()).backward()
    grads = {"hidden": h.grad}
    if trains:
        grads["weight"] = w.grad
        if b is not None:
            grads["bias"] = b.grad
    return {k: v.detach() for k, v in values.items()}, grads, splits


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


def run_case(case: KernelCase, device: str | torch.device, *, generator: torch.Generator | None = None,
             tokens: int | None = None) -> dict:
    """Run ``case`` on ``device`` and judge it (see the module docstring). Returns its record: the shape,
    ``splits`` (of each forward launch), ``finite``, ``ignored_exactly_zero``, ``regime_ok``, per output and
    gradient ``err``, ``eager_err`` and ``limit`` (max absolute errors against float64), ``passed`` and
    ``seconds``. ``tokens`` overrides :func:`case_tokens`; ``generator`` (on ``device``) draws the inputs,
    else one seeded from the global generator."""
    device = torch.device(device)
    if case.op not in ("token_kl", "logprobs"):
        raise ValueError(f"case.op: expected 'token_kl' or 'logprobs'; got {case.op!r}")
    if case.head not in ("trained", "frozen"):
        raise ValueError(f"case.head: expected 'trained' or 'frozen'; got {case.head!r}")
    if case.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"case.dtype: expected 'float32', 'bfloat16' or 'float16'; got {case.dtype!r}")
    if case.regime not in ("split", "tiled", None):
        raise ValueError(f"case.regime: expected 'split', 'tiled' or None; got {case.regime!r}")
    t0 = time.perf_counter()
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ())))
    n = tokens if tokens is not None else case_tokens(case, device)
    x = _inputs(case, n, device, generator)
    temperature = 1.0 if case.op == "token_kl" else 0.7
    common = dict(ref_bias=x["ref_bias"], head_trains=case.head == "trained", temperature=temperature,
                  ignore_index=IGNORE, softcap=case.softcap,
                  rows_per_chunk=max(1, REFERENCE_ELEMENTS[device.type] // case.vocab))

    def as64(t):
        return None if t is None else t.double()

    ref_values, ref_grads = reference_outputs(
        as64(x["hidden"]), as64(x["weight"]), x["targets"], x["upstream"], as64(x["ref_hidden"]),
        as64(x["ref_weight"]), bias=as64(x["bias"]), **{**common, "ref_bias": as64(x["ref_bias"])})
    # fp32 products in fp32, not TF32, whatever the process set before: the yardstick and the op's own
    # torch products (dS @ W) are then the fp32 arithmetic the kernels' "ieee" dots are held to.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        eager_values, eager_grads = reference_outputs(
            x["hidden"], x["weight"], x["targets"], x["upstream"], x["ref_hidden"], x["ref_weight"],
            bias=x["bias"], softmax_dtype=torch.float32, **common)
        values, grads, splits = _run_op(case, x, temperature)
    finally:
        torch.set_float32_matmul_precision(precision)

    got = {**values, **{f"d_{k}": g for k, g in grads.items()}}
    ref = {**ref_values, **{f"d_{k}": g for k, g in ref_grads.items()}}
    eager = {**eager_values, **{f"d_{k}": g for k, g in eager_grads.items()}}
    if set(got) != set(ref):
        raise AssertionError(f"the op returned {sorted(got)}; the reference {sorted(ref)}")
    err = {k: _max_err(got[k], ref[k]) for k in ref}
    eager_err = {k: _max_err(eager[k], ref[k]) for k in ref}
    log_prob_scale = max(ref[k].abs().max().item() for k in ("logp", "ref_logp") if k in ref)
    scale = {k: log_prob_scale if k in values else ref[k].abs().max().item() for k in ref}
    limit = {k: EAGER_FACTOR * eager_err[k] + UNIT_ROUNDOFF[got[k].dtype] * scale[k] for k in ref}
    ignored = x["targets"] == IGNORE
    finite = all(bool(torch.isfinite(t).all()) for t in got.values())
    ignored_zero = all(bool((values[k][ignored] == 0).all()) for k in values) and bool(
        (grads["hidden"][ignored] == 0).all())
    regime_ok = {"split": bool(splits) and all(s > 1 for s in splits),
                 "tiled": bool(splits) and all(s == 1 for s in splits), None: True}[case.regime]
    record = {**dataclasses.asdict(case), "case": case.name, "device": str(device), "N": n, "splits": splits,
              "temperature": temperature, "finite": finite, "ignored_exactly_zero": ignored_zero,
              "regime_ok": regime_ok, "err": err, "eager_err": eager_err, "limit": limit}
    record["passed"] = finite and ignored_zero and regime_ok and all(err[k] <= limit[k] for k in err)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    if device.type == "cuda":
        del x, got, ref, eager, values, grads
        torch.cuda.empty_cache()
    return record


def describe(record: dict) -> str:
    """One line per failing check of a record, for an assertion message."""
    lines = [f"{record['case']} N={record['N']} on {record['device']}, splits {record['splits']}"]
    lines += [f"  {k}: error {record['err'][k]:.3e} > limit {record['limit'][k]:.3e} "
              f"(eager {record['eager_err'][k]:.3e})" for k in record["err"] if record["err"][k] > record["limit"][k]]
    lines += [f"  {k} is False" for k in ("finite", "ignored_exactly_zero", "regime_ok") if not record[k]]
    return "\n".join(lines)


def _interpreted() -> bool:
    from firempo_kernels.csrc_triton.logits_tile import INTERPRETED

    return INTERPRETED


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("device", ["cuda", pytest.param("cpu", marks=pytest.mark.interpreter)])
def test_kernel_case(case, device):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the compiled kernels run only there (the cpu cases run these under "
                        "the Triton interpreter)")
        if _interpreted():
            pytest.skip("TRITON_INTERPRET=1 is set: these cases test the compiled kernels")
    else:
        case = small(case)
    record = run_case(case, device)
    assert record["passed"], describe(record)


def test_case_design_covers_every_pair_of_levels():
    factors = {
        "op": lambda c: c.op, "dtype": lambda c: c.dtype, "vocab": lambda c: c.vocab, "head": lambda c: c.head,
        "cap": lambda c: c.softcap is not None, "regime": lambda c: c.regime,
    }
    names = list(factors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs = {(factors[a](c), factors[b](c)) for c in CASES}
            assert len(pairs) == 4, (a, b, pairs)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_wrong_row_fails_the_case(dtype, monkeypatch):
    """A row-indexing slip, the last row given the first row's statistics, is caught in both dtypes."""
    from firempo_kernels import csrc_triton

    real = csrc_triton.token_stats_partials

    def broken(*args, **kwargs):
        partials = real(*args, **kwargs)
        partials[..., -1] = partials[..., 0]  # the last row takes the first row's statistics
        return partials

    monkeypatch.setattr(csrc_triton, "token_stats_partials", broken)
    record = run_case(KernelCase("token_kl", dtype, 300, 40, "trained", regime="tiled"), "cpu")
    assert not record["passed"] and record["err"]["logp"] > record["limit"]["logp"], describe(record)


@pytest.mark.interpreter
def test_a_slightly_wrong_gradient_fails_the_fp32_case(monkeypatch):
    """dS off by 1e-4 relative, far below what bf16 can see, is caught in fp32."""
    from firempo_kernels import csrc_triton

    real = csrc_triton.token_dlogits
    monkeypatch.setattr(csrc_triton, "token_dlogits", lambda *a, **k: real(*a, **k) * (1 + 1e-4))
    record = run_case(KernelCase("logprobs", "float32", 300, 40, "frozen", SOFTCAP, "split"), "cpu")
    assert not record["passed"] and record["err"]["d_hidden"] > record["limit"]["d_hidden"], describe(record)


def test_a_malformed_case_names_its_field():
    with pytest.raises(ValueError, match="case.head: expected 'trained' or 'frozen'; got 'thawed'"):
        run_case(KernelCase("logprobs", "float32", 300, 40, "thawed"), "cpu")
    with pytest.raises(ValueError, match="case.regime"):
        run_case(KernelCase("logprobs", "float32", 300, 40, "frozen", regime="chunked"), "cpu")


def test_chunked_reference_meets_the_op_in_float64(monkeypatch):
    """The chunked driver (rows in chunks of 4, the head's gradient summed across them, upstream weights on
    every output) against the op's torch path in float64, where both are exact to ~1e-15."""
    import firempo_kernels as fk

    monkeypatch.setenv("FIREMPO_BACKEND", "torch")
    gen = torch.Generator().manual_seed(1)
    n, d, v = 9, 8, 40
    h, rh, w, rw = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((n, d), (n, d), (v, d), (v, d)))
    b = torch.randn(v, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=gen)
    y[3] = IGNORE
    up = {k: torch.randn(n, generator=gen, dtype=torch.float64) for k in DIFFERENTIABLE}
    values, grads = reference_outputs(h, w, y, up, rh, rw, bias=b, head_trains=True, temperature=0.7, softcap=3.0,
                                      rows_per_chunk=4)
    hl, wl, bl = (x.clone().requires_grad_() for x in (h, w, b))
    got = fk.fused_linear_token_kl(hl, wl, rh, rw, y, bias=bl, temperature=0.7, softcap=3.0)
    sum((g * getattr(got, k)).sum() for k, g in up.items()).backward()
    for name, value in got._asdict().items():
        torch.testing.assert_close(value, values[name], rtol=1e-10, atol=1e-12)
    for name, leaf in (("hidden", hl), ("weight", wl), ("bias", bl)):
        torch.testing.assert_close(leaf.grad, grads[name], rtol=1e-10, atol=1e-12)
