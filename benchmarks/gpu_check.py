"""One command on a CUDA machine: every kernel path against float64, then the benchmark table and the floor.

    bash benchmarks/gpu_check.sh                  # results under $OUT (default benchmarks/report/gpu)
    python benchmarks/gpu_check.py --out DIR [--budget-s 280] [--skip-bench]

Sized to finish in under 5 minutes on an H100 or H200 (``--budget-s`` stops starting new work once spent;
what did not run says so). Three stages, each writing into ``--out``:

1. Correctness: the CUDA cases of the test suite (tests/test_cuda_kernels.py: fp32 and bf16, V = 151936
   and 262144, soft-capped logits, the trained and the frozen head, the vocabulary-split and the tiled
   launch), then a shape sweep through the same ``run_case``: V in {151936, 262144}, d in {2560, 3584}, N
   in {64, 512, 8192}, fp32 and bf16, ``fused_linear_token_kl`` with a trained head and a bias and
   ``fused_linear_logprobs`` with a frozen head and soft-capped logits. One oracle for both: float64
   autograd over full logits (tests/reference.py), and the tolerance rule of that module, from the error
   of eager PyTorch in the same dtype. Fresh random inputs (the seed is printed; ``--seed`` replays).
2. Rates on this card, this run: the bf16 GEMM rate (8192^3) and copy bandwidth.
3. ``benchmarks/report.py --profile gpu`` in this process (allocator peaks), then, for every fused op row,
   the bf16 cuBLAS time of exactly the matrix products the op performs (forward logits of each model, their
   rebuild in the backward, dS @ W, and dS^T @ h when the head trains) and the fraction of it the op reaches.

Files under ``--out``: gpu_check.md (the summary), gpu_check.json, report.md and results.json (the table).
"""

import argparse
import dataclasses
import importlib.abc
import importlib.util
import json
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

VOCABS = (151936, 262144)
DIMS = (2560, 3584)
TOKENS = (64, 512, 8192)


# ------------------------------------------------------------------------------------------------------
# Stage 1: correctness, by the CUDA cases of the test suite (tests/test_cuda_kernels.py)
# ------------------------------------------------------------------------------------------------------
def kernel_cases():
    """The test suite's case module (its float64 reference is tests/reference.py): one set of cases, one
    oracle, whether pytest or this script runs them."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import test_cuda_kernels

    return test_cuda_kernels


def correctness_plan(smoke: bool = False) -> list:
    """The suite's CUDA cases, then the shape sweep: for every (V, d, N) and dtype, the trained head with a
    bias and a reference model, and the frozen head with soft-capped logits. ``smoke``: the suite's four
    few-token cases (both dtypes, ops and heads, capped and not) at the interpreter's sizes on CPU tensors;
    it rehearses this script, while the suite runs all eight cases so on every machine."""
    kc = kernel_cases()
    if smoke:
        return [kc.small(c) for c in kc.CASES if c.regime == "split"]
    sweep = [
        kc.KernelCase(op, dtype, vocab, d, head, softcap, regime=None, tokens=n)
        for vocab in VOCABS for n in TOKENS for d in DIMS for dtype in ("float32", "bfloat16")
        for op, head, softcap in (("token_kl", "trained", None), ("logprobs", "frozen", kc.SOFTCAP))
    ]
    return list(kc.CASES) + sweep


def run_correctness(plan, device, deadline, seed, log) -> list[dict]:
    """Each case's record from the suite's ``run_case``; a case left by the budget or one that crashed says so."""
    kc = kernel_cases()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    records = []
    for case in plan:
        stub = {**dataclasses.asdict(case), "case": case.name, "N": case.tokens}
        if time.monotonic() > deadline:
            records.append({**stub, "passed": None, "note": "not run (time budget)"})
            continue
        try:
            rec = kc.run_case(case, device, generator=gen)
        except Exception as err:  # noqa: BLE001 - a crash is a failed check with its reason
            rec = {**stub, "passed": False, "note": f"{type(err).__name__}: {err}"[:400]}
        records.append(rec)
        worst = _worst(rec)
        log(f"correctness {case.name} N={rec['N']}: {'PASS' if rec['passed'] else 'FAIL'}"
            f"{f' (worst {worst})' if worst else ''} {rec.get('note', '')}")
    return records


def _worst(rec: dict) -> str:
    """The output or gradient nearest its limit, as 'name: error / limit'."""
    if "err" not in rec:
        return ""
    key = max(rec["err"], key=lambda k: rec["err"][k] / max(rec["limit"][k], 1e-300))
    return f"{key}: {rec['err'][key]:.2e} / {rec['limit'][key]:.2e}"


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
           f"## Correctness ({env['kernels']} Triton kernels against float64, tests/test_cuda_kernels.py)", "",
           "Limit per output and gradient: 4 x the largest error of eager PyTorch in the same dtype, plus the "
           "rounding of the exact result to the output's dtype (that module's docstring says why).", "",
           "| case | N | splits | pass | worst error / limit | finite | ignored = 0 | regime | s |",
           "|---|---:|---|---|---|---|---|---|---:|"]
    for r in correctness:
        worst = _worst(r) or r.get("note", "")
        verdict = {True: "pass", False: "FAIL", None: "not run"}[r.get("passed")]
        splits = ",".join(str(x) for x in sorted(set(r["splits"]))) if r.get("splits") else "-"
        out.append(f"| {r['case']} | {r['N'] or '-'} | {splits} | {verdict} | {worst} | {r.get('finite', '-')} "
                   f"| {r.get('ignored_exactly_zero', '-')} | {r.get('regime_ok', '-')} | {r.get('seconds', '-')} |")
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
    parser.add_argument("--smoke", action="store_true", help="the suite's cases at small shapes on CPU tensors, the kernels under the Triton interpreter "
                        "(the CPU rehearsal of this script)")
    args = parser.parse_args(argv)

    t_start = time.monotonic()
    if args.smoke:
        # The rehearsal runs the kernels on CPU tensors, which only the interpreter can; Triton chooses it when
        # the kernels are decorated, so before the import below.
        os.environ["TRITON_INTERPRET"] = "1"
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
    env["kernels"] = "interpreted" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
    deadline = t_start + args.budget_s * args.correctness_share
    correctness = run_correctness(correctness_plan(smoke), device, deadline, seed, log)

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
