"""One command on a CUDA machine: every kernel path against float64, then the benchmark table and the floor.

    bash benchmarks/gpu_check.sh                  # results under $OUT (default benchmarks/report/gpu)
    python benchmarks/gpu_check.py --out DIR [--budget-s 280] [--skip-bench]

Sized to finish in under 5 minutes on an H100 or H200 (``--budget-s`` stops starting new work once spent;
what did not run says so). Three stages, each writing into ``--out``:

1. Correctness, ``FIREMPO_BACKEND=triton``, fp32 and bf16, V = 151936, d in {2560, 3584}, N in {64, 512,
   8192} (plus N = 5 and 17 at d = 2560, which select the 16- and 32-row tiles), fresh random inputs (the
   seed is printed): ``fused_linear_token_kl`` with a trainable head and a bias and ``fused_linear_logprobs``
   with a frozen head at temperature 0.7, some targets ignored, random upstream gradients on every output.
   The reference is float64 autograd over full logits, chunked over rows. Before each call the CUDA caching
   allocator is filled with NaN and released, so an output element a kernel forgets to write is NaN, not
   a stale plausible number. fp32 passes at 1e-5 (values, relative to max(1, |ref|)) and 1e-4 (gradients,
   relative to max |ref|); bf16 passes when its error is at most 1.25x that of eager PyTorch on the same bf16
   inputs, plus 1e-3. Ignored positions must be exactly 0, with exactly zero rows of dh.
2. Rates on this card, this run: the bf16 GEMM rate (8192^3) and copy bandwidth.
3. ``benchmarks/report.py --profile gpu`` in this process (allocator peaks), then, for every fused op row,
   the bf16 cuBLAS time of exactly the matrix products the op performs (forward logits of each model, their
   rebuild in the backward, dS @ W, and dS^T @ h when the head trains) and the fraction of it the op reaches.

Files under ``--out``: gpu_check.md (the summary), gpu_check.json, report.md and results.json (the table).
"""

import argparse
import contextlib
import importlib.abc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# setup.py maps these folders into the firempo_kernels namespace.
_MAPPED = {"firempo_kernels.csrc_triton": "csrc_triton", "firempo_kernels.integrations": "integrations"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the folders setup.py maps into the namespace (``firempo_kernels.csrc_triton`` ->
    ``csrc_triton/``) in a checkout; their submodules then load from the package's own path."""

    def __init__(self, repo: Path):
        self.repo = repo

    def find_spec(self, fullname, path=None, target=None):
        folder = _MAPPED.get(fullname)
        if folder is None:
            return None
        init = self.repo / folder / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def ensure_importable(repo: Path = REPO) -> str:
    """Import ``firempo_kernels`` from an install if there is one, else straight from this checkout (a GPU
    machine gets the working tree, not the install). Returns where it came from."""
    try:
        import firempo_kernels.csrc_triton  # noqa: F401

        return "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "firempo_kernels" or m.startswith("firempo_kernels.")]:
        del sys.modules[name]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder(repo))
    import firempo_kernels.csrc_triton  # noqa: F401, F811

    return "checkout"


if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VOCAB = 151936
DIMS = (2560, 3584)
TOKENS = (64, 512, 8192)
SMALL_TOKENS = (5, 17)  # 16- and 32-row tiles; run at the first d only
IGNORE = -100


# ------------------------------------------------------------------------------------------------------
# Stage 1: correctness
# ------------------------------------------------------------------------------------------------------
def eager_outputs(h, w, b, rh, rw, rb, y, tau, upstream, *, need_dw, chunk=None):
    """Per-token outputs and gradients by autograd over full logits, in the inputs' dtype (float64 for the
    reference; bf16 for the eager baseline, its logits rounded to bf16 as an eager bf16 model's are).

    ``upstream`` = (g_lp, g_f, g_r) [N] float, (g_f, g_r) None for the log-prob op. Returns
    (outputs dict, dh, dw or None, db or None); outputs in float64."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    n = h.shape[0]
    chunk = chunk or max(n, 1)
    g_lp, g_f, g_r = upstream
    has_ref = rh is not None
    w_leaf = w.detach().requires_grad_(need_dw)
    b_leaf = None if b is None else b.detach().requires_grad_(need_dw)
    names = ("logp", "ref_logp", "kl_forward", "kl_reverse") if has_ref else ("logp",)
    outs = {k: torch.zeros(n, dtype=torch.float64, device=h.device) for k in names}
    dh = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
    valid_all = y != IGNORE
    for i in range(0, n, chunk):
        rows = slice(i, min(n, i + chunk))
        hc = h[rows].detach().requires_grad_(True)
        s = hc @ w_leaf.T
        if b_leaf is not None:
            s = s + b_leaf
        logp_all = torch.log_softmax(s.to(acc) / tau, dim=-1)
        valid = valid_all[rows]
        idx = y[rows].clamp(min=0)[:, None]
        logp = torch.where(valid, logp_all.gather(-1, idx)[:, 0], 0.0)
        total = (g_lp[rows].to(acc) * logp).sum()
        outs["logp"][rows] = logp.detach().double()
        if has_ref:
            with torch.no_grad():
                t = rh[rows] @ rw.T
                if rb is not None:
                    t = t + rb
                ref_all = torch.log_softmax(t.to(acc) / tau, dim=-1)
            kl_f = torch.where(valid, (ref_all.exp() * (ref_all - logp_all)).sum(-1), 0.0)
            kl_r = torch.where(valid, (logp_all.exp() * (logp_all - ref_all)).sum(-1), 0.0)
            total = total + (g_f[rows].to(acc) * kl_f).sum() + (g_r[rows].to(acc) * kl_r).sum()
            outs["ref_logp"][rows] = torch.where(valid, ref_all.gather(-1, idx)[:, 0], 0.0).double()
            outs["kl_forward"][rows] = kl_f.detach().double()
            outs["kl_reverse"][rows] = kl_r.detach().double()
        total.backward()
        dh[rows] = hc.grad
        del s, logp_all, total
    return outs, dh, w_leaf.grad if need_dw else None, (b_leaf.grad if need_dw and b_leaf is not None else None)


def poison_cuda_cache(device, max_bytes: int = 16 << 30) -> None:
    """Fill memory the caching allocator will hand out next with NaN bytes (0xFF.. is NaN in fp32 and bf16)."""
    if torch.device(device).type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(max_bytes, int(free * 0.5))
    blob = torch.empty(nbytes, dtype=torch.uint8, device=device)
    blob.fill_(0xFF)
    del blob  # stays reserved in the cache, NaN-filled


def _rel(err_of, ref, floor_one: bool) -> float:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    scale = max(scale, 1.0) if floor_one else max(scale, 1e-30)
    return err_of / scale


def compare(got: dict, ref: dict, floor_one: bool) -> dict:
    return {k: _rel((got[k].double() - ref[k].double()).abs().max().item() if ref[k].numel() else 0.0,
                    ref[k].double(), floor_one) for k in ref}


def check_case(op, n, d, dtype, device, gen, *, vocab=VOCAB, ref_chunk=1024, backend="triton") -> dict:
    """One correctness case; returns its record (errors, pass/fail, timings)."""
    import firempo_kernels as fk

    t0 = time.perf_counter()
    kl = op == "token_kl"
    std = 2.0 / math.sqrt(d)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device) * scale

    h32, rh32 = rnd(n, d), None
    w32 = rnd(vocab, d, scale=std)
    b32 = rnd(vocab, scale=0.5) if kl else None
    rw32 = rb32 = None
    if kl:
        rh32 = h32 + 0.3 * rnd(n, d)
        rw32 = w32 + 0.1 * rnd(vocab, d, scale=std)
        rb32 = b32 + 0.1 * rnd(vocab, scale=0.5)
    y = torch.randint(0, vocab, (n,), generator=gen, device=device)
    y[torch.rand(n, generator=gen, device=device) < 0.05] = IGNORE
    upstream = (rnd(n), rnd(n) if kl else None, rnd(n) if kl else None)
    tau = 1.0 if kl else 0.7
    need_dw = kl  # token_kl: head trains (dW, db); logprobs: frozen head (no dW work at all)

    cast = [None if x is None else x.to(dtype) for x in (h32, w32, b32, rh32, rw32, rb32)]
    h, w, b, rh, rw, rb = cast

    # The reference: float64, from the same (rounded) inputs.
    as64 = [None if x is None else x.double() for x in cast]
    ref_out, ref_dh, ref_dw, ref_db = eager_outputs(*as64, y, tau, upstream, need_dw=need_dw, chunk=ref_chunk)
    ref = {**ref_out, "dh": ref_dh}
    if need_dw:
        ref.update(dw=ref_dw, db=ref_db)
    del as64

    # The fused op under test.
    hl = h.detach().requires_grad_(True)
    wl = w.detach().requires_grad_(need_dw)
    bl = None if b is None else b.detach().requires_grad_(need_dw)
    poison_cuda_cache(device)
    with _backend(backend):
        if kl:
            res = fk.fused_linear_token_kl(hl, wl, rh, rw, y, bias=bl, ref_bias=rb, temperature=tau)
            got = dict(res._asdict())
            total = (upstream[0] * res.logp + upstream[1] * res.kl_forward + upstream[2] * res.kl_reverse).sum()
        else:
            got = {"logp": fk.fused_linear_logprobs(hl, wl, y, temperature=tau)}
            total = (upstream[0] * got["logp"]).sum()
        total.backward()
    got["dh"] = hl.grad
    if need_dw:
        got.update(dw=wl.grad, db=bl.grad)
    ignored = y == IGNORE
    finite = all(bool(torch.isfinite(v).all()) for v in got.values())
    ignored_zero = all(bool((got[k][ignored] == 0).all()) for k in ref_out) and bool((got["dh"][ignored] == 0).all())

    value_keys, grad_keys = list(ref_out), [k for k in ("dh", "dw", "db") if k in ref]
    err = {**compare({k: got[k] for k in value_keys}, {k: ref[k] for k in value_keys}, floor_one=True),
           **compare({k: got[k] for k in grad_keys}, {k: ref[k] for k in grad_keys}, floor_one=False)}
    record = {"op": op, "N": n, "d": d, "V": vocab, "dtype": str(dtype).replace("torch.", ""),
              "head": "trainable+bias" if need_dw else "frozen", "temperature": tau,
              "finite": finite, "ignored_exactly_zero": ignored_zero, "err": err}

    if dtype == torch.float32:
        limits = {k: (1e-5 if k in value_keys else 1e-4) for k in err}
    else:  # bf16/fp16: no worse than eager PyTorch on the same inputs, plus a small tolerance
        eager_chunk = None
        while True:
            try:
                e_out, e_dh, e_dw, e_db = eager_outputs(h, w, b, rh, rw, rb, y, tau, upstream, need_dw=need_dw,
                                                        chunk=eager_chunk)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                eager_chunk = max(1, (eager_chunk or n) // 4)
        eager = {**e_out, "dh": e_dh, **({"dw": e_dw, "db": e_db} if need_dw else {})}
        e_err = {**compare({k: eager[k] for k in value_keys}, {k: ref[k] for k in value_keys}, floor_one=True),
                 **compare({k: eager[k] for k in grad_keys}, {k: ref[k] for k in grad_keys}, floor_one=False)}
        record["eager_err"] = e_err
        record["eager_chunk"] = eager_chunk
        limits = {k: 1.25 * e_err[k] + 1e-3 for k in err}
        del eager, e_out
    record["limit"] = limits
    record["passed"] = finite and ignored_zero and all(err[k] <= limits[k] for k in err)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    del ref, got
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return record


@contextlib.contextmanager
def _backend(name):
    old = os.environ.get("FIREMPO_BACKEND")
    os.environ["FIREMPO_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FIREMPO_BACKEND", None)
        else:
            os.environ["FIREMPO_BACKEND"] = old


def correctness_plan(dims=DIMS, tokens=TOKENS, small_tokens=SMALL_TOKENS, dtypes=("float32", "bfloat16")):
    """Real shapes first (should the budget run out, the cheap tile-coverage cases are the ones left)."""
    plan = [(op, n, d, dt) for n in tokens for d in dims for dt in dtypes for op in ("token_kl", "logprobs")]
    plan += [(op, n, dims[0], dt) for n in small_tokens for dt in dtypes for op in ("token_kl", "logprobs")]
    return plan


def run_correctness(plan, device, deadline, seed, log, vocab=VOCAB, ref_chunk=1024, backend="triton") -> list[dict]:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    records = []
    for op, n, d, dt in plan:
        if time.monotonic() > deadline:
            records.append({"op": op, "N": n, "d": d, "dtype": dt, "passed": None, "note": "not run (time budget)"})
            continue
        try:
            rec = check_case(op, n, d, getattr(torch, dt), device, gen, vocab=vocab, ref_chunk=ref_chunk,
                             backend=backend)
        except Exception as err:  # noqa: BLE001 - a crash is a failed check with its reason
            rec = {"op": op, "N": n, "d": d, "dtype": dt, "passed": False, "note": f"{type(err).__name__}: {err}"[:400]}
        records.append(rec)
        worst = max(rec.get("err", {}).items(), key=lambda kv: kv[1] / max(rec["limit"][kv[0]], 1e-30),
                    default=("-", float("nan")))
        log(f"correctness {op:9s} N={n:5d} d={d} {dt:9s}: {'PASS' if rec['passed'] else 'FAIL'}"
            f" (worst {worst[0]} {worst[1]:.2e}) {rec.get('note', '')}")
    return records


# ------------------------------------------------------------------------------------------------------
# Stage 2: rates, and the matrix products of one op
# ------------------------------------------------------------------------------------------------------
def _cuda_time_ms(fn, reps=5, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_rate_tflops(device, size=8192) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = _cuda_time_ms(lambda: a @ b, reps=10, warmup=3)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def copy_bandwidth_tbps(device, nbytes=1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _cuda_time_ms(lambda: dst.copy_(src), reps=10, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e12  # read + write


def op_products(workload: str, n: int, vocab: int, d: int, head_trains: bool, rebuild: bool = True):
    """The matrix products one forward + backward of the op performs, as (M, K, N) of an [M, K] @ [K, N].

    Forward: logits of each model [n, d] @ [d, V]. Backward: the same logits rebuilt from the saved
    statistics (``rebuild``), dh = dS @ W, and dW = dS^T @ h only when the head trains."""
    models = 2 if workload == "token_kl" else 1
    logits = (n, d, vocab)
    products = [logits] * models
    if rebuild:
        products += [logits] * models
    products.append((n, vocab, d))  # dh
    if head_trains:
        products.append((vocab, n, d))  # dW
    return products


def products_time_ms(products, device, cache: dict) -> float:
    total = 0.0
    for mkn in products:
        if mkn not in cache:
            m, k, n = mkn
            a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
            cache[mkn] = _cuda_time_ms(lambda: a @ b)
            del a, b
        total += cache[mkn]
    return total


def floor_rows(records, device, tflops) -> list[dict]:
    cache: dict = {}
    rows = []
    for r in records:
        c = r["case"]
        if r.get("status") != "ok" or c["method"] != "fused" or c["workload"] == "loss":
            continue
        trains = c["head"] == "trainable"
        with_rebuild = op_products(c["workload"], c["tokens"], c["vocab"], c["dim"], trains)
        without = op_products(c["workload"], c["tokens"], c["vocab"], c["dim"], trains, rebuild=False)
        gemm_ms = products_time_ms(with_rebuild, device, cache)
        gemm_min_ms = products_time_ms(without, device, cache)
        flops = sum(2 * m * k * n for m, k, n in with_rebuild)
        rows.append({
            "workload": c["workload"], "N": c["tokens"], "d": c["dim"], "V": c["vocab"], "head": c["head"],
            "fused_ms": r["time_ms"], "gflop": flops / 1e9, "gemm_ms": gemm_ms, "gemm_no_rebuild_ms": gemm_min_ms,
            "flop_floor_ms": flops / (tflops * 1e12) * 1e3,
            "fraction_of_gemm": gemm_ms / r["time_ms"], "fraction_no_rebuild": gemm_min_ms / r["time_ms"],
        })
    return rows


# ------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------
def render_summary(env, correctness, rates, floors, bench_note) -> str:
    out = ["# GPU check", "",
           f"Card: {env['device']} ({env['sms']} SMs, {env['memory_gib']:.0f} GiB); torch {env['torch']}, "
           f"triton {env['triton']}; firempo_kernels from the {env['source']}; date {env['date']}; "
           f"command `bash benchmarks/gpu_check.sh`; seed {env['seed']}.", "",
           f"## Correctness (FIREMPO_BACKEND={env.get('backend', 'triton')}, float64 reference)", "",
           "| op | N | d | dtype | head | pass | worst error / limit | finite | ignored = 0 | s |",
           "|---|---:|---:|---|---|---|---|---|---|---:|"]
    for r in correctness:
        if "err" in r:
            key = max(r["err"], key=lambda k: r["err"][k] / max(r["limit"][k], 1e-30))
            worst = f"{key}: {r['err'][key]:.2e} / {r['limit'][key]:.2e}"
        else:
            worst = r.get("note", "")
        verdict = {True: "pass", False: "FAIL", None: "not run"}[r.get("passed")]
        out.append(f"| {r['op']} | {r['N']} | {r['d']} | {r['dtype']} | {r.get('head', '-')} | {verdict} | {worst} "
                   f"| {r.get('finite', '-')} | {r.get('ignored_exactly_zero', '-')} | {r.get('seconds', '-')} |")
    out += ["", "## Rates measured in this run", ""]
    if rates:
        out.append(f"bf16 GEMM 8192^3: {rates['gemm_tflops']:.0f} TFLOP/s; device copy: {rates['copy_tbps']:.2f} TB/s "
                   "(read + write).")
    out += ["", "## Fraction of the GEMM floor (fused ops, forward + backward, bf16)", "",
            "The floor is the bf16 cuBLAS time, on this card in this run, of exactly the matrix products the op "
            "performs; 'no rebuild' leaves out the backward's recomputation of the logits (the price of never "
            "storing N x V).", "",
            "| op | N | d | head | GFLOP | fused ms | GEMM ms | GEMM ms, no rebuild | floor / fused | no rebuild / fused |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for f in floors:
        out.append(f"| {f['workload']} | {f['N']} | {f['d']} | {f['head']} | {f['gflop']:.0f} | {f['fused_ms']:.2f} | "
                   f"{f['gemm_ms']:.2f} | {f['gemm_no_rebuild_ms']:.2f} | {100 * f['fraction_of_gemm']:.0f}% | "
                   f"{100 * f['fraction_no_rebuild']:.0f}% |")
    out += ["", "## Benchmark table", "", bench_note]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "benchmarks/report/gpu")))
    parser.add_argument("--budget-s", type=float, default=280.0, help="start no new work after this many seconds")
    parser.add_argument("--correctness-share", type=float, default=0.5, help="part of the budget for stage 1")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (tests of this script)")
    args = parser.parse_args(argv)

    t_start = time.monotonic()
    source = ensure_importable()
    from benchmarks import report
    from firempo_kernels.integrations.cli import write_whole

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check (use --smoke for the CPU test of this script)")
        return 2
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    import triton

    props = torch.cuda.get_device_properties(0) if device == "cuda" else None
    env = {
        "device": torch.cuda.get_device_name(0) if props else "cpu (smoke)",
        "sms": props.multi_processor_count if props else os.cpu_count(),
        "memory_gib": props.total_memory / (1 << 30) if props else 0.0,
        "torch": torch.__version__, "triton": triton.__version__, "source": source, "seed": seed,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    log(f"gpu_check: {env['device']}, torch {env['torch']}, triton {env['triton']}, seed {seed}")
    backend = "triton"
    if smoke:
        plan = correctness_plan(dims=(32,), tokens=(40,), small_tokens=(5,), dtypes=("float32", "bfloat16"))
        vocab, ref_chunk = 300, 16
        # Off a GPU the kernels run only under the Triton interpreter; otherwise check the torch path.
        backend = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    else:
        plan, vocab, ref_chunk = correctness_plan(), VOCAB, 1024
    env["backend"] = backend
    deadline = t_start + args.budget_s * args.correctness_share
    correctness = run_correctness(plan, device, deadline, seed, log, vocab=vocab, ref_chunk=ref_chunk,
                                  backend=backend)

    rates, floors, bench_records = {}, [], []
    bench_note = "not run (--skip-bench)" if args.skip_bench else ""
    if device == "cuda" and not args.skip_bench:
        rates = {"gemm_tflops": gemm_rate_tflops(device), "copy_tbps": copy_bandwidth_tbps(device)}
        log(f"bf16 GEMM {rates['gemm_tflops']:.0f} TFLOP/s, copy {rates['copy_tbps']:.2f} TB/s")
        profile = report.gpu_profile()
        remaining_min = max(0.0, (t_start + args.budget_s - time.monotonic()) / 60 - 0.5)
        bench_records = report.run_all(profile, in_process=True, budget_min=remaining_min, log=log)
        report.write_outputs(profile, bench_records, args.out, "bash benchmarks/gpu_check.sh", results_md=None)
        floors = floor_rows(bench_records, device, rates["gemm_tflops"])
        bench_note = "See report.md (same directory): every method at V = 151936, bf16, allocator peaks."

    summary = render_summary(env, correctness, rates, floors, bench_note)
    write_whole(args.out / "gpu_check.md", summary)
    write_whole(args.out / "gpu_check.json", json.dumps(
        {"env": env, "correctness": correctness, "rates": rates, "floors": floors}, indent=1, default=str))
    failed = [r for r in correctness if r.get("passed") is False]
    log(f"gpu_check: {len(correctness) - len(failed)}/{len(correctness)} correctness cases without failure; "
        f"{(time.monotonic() - t_start):.0f} s; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
