"""The pytest-benchmark suite: every method of every workload, forward, backward and both.

    pytest benchmarks/                          # the report's CPU shapes (N = 4096, V = 32000, ...): ~40 min
                                                # on a quiet 2-core machine; select with -k
    pytest benchmarks/ --bench-size small       # quick shapes
    pytest benchmarks/ --bench-device cuda      # V = 151936, d = 3584, bf16
    pytest benchmarks/ -k "loss and vqa"        # one regime

Cases of one shape and mode share a benchmark group, so pytest-benchmark's table compares the methods.
Peak memory here is taken in-process (``extra_info``); the numbers in RESULTS.md come from
``benchmarks/report.py``, which measures each case in a fresh process.
"""

import os
import sys
from pathlib import Path

# Before torch loads its OpenMP runtime: sleeping barrier waits (see benchmarks/report.py, worker_env).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuMemory, CudaMemory, Stepper, _Glibc  # noqa: E402
from benchmarks.workloads import Case, skip_reason  # noqa: E402

SIZES = {
    # device -> size -> (op shape, loss shape, dtype)
    "cpu": {
        "full": (dict(vocab=32000, dim=512, tokens=4096), dict(vocab=32000, dim=512, batch=2, seq=512), "float32"),
        "small": (dict(vocab=8000, dim=256, tokens=512), dict(vocab=8000, dim=256, batch=1, seq=128), "float32"),
    },
    "cuda": {
        "full": (dict(vocab=151936, dim=3584, tokens=8192), dict(vocab=151936, dim=3584, batch=2, seq=1024),
                 "bfloat16"),
        "small": (dict(vocab=32000, dim=2560, tokens=512), dict(vocab=32000, dim=2560, batch=1, seq=512),
                  "bfloat16"),
    },
}


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=("full", "small"), default="full")
    parser.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu")
    parser.addoption("--bench-rounds", type=int, default=3, help="timed rounds per case (after one warm-up)")


@pytest.fixture
def sizes(request):
    return SIZES[request.config.getoption("--bench-device")][request.config.getoption("--bench-size")]


@pytest.fixture
def device(request):
    return request.config.getoption("--bench-device")


@pytest.fixture
def run_case(benchmark, request):
    """Benchmark one case in one mode; the group is the shape and mode, so methods sit side by side."""
    rounds = request.config.getoption("--bench-rounds")

    def run(case: Case, mode: str):
        reason = skip_reason(case)
        if reason:
            pytest.skip(reason)
        stepper = Stepper(case)
        stepper.run()  # warm-up: compilation, thread pools
        sync = stepper._sync
        benchmark.group = f"{case.workload} {case.regime} {case.head} {case.shape_label()} {case.dtype} | {mode}"
        benchmark.extra_info.update(case.to_dict())

        if mode == "forward":
            def target():
                loss = stepper.step()
                sync()
                return float(loss.detach())
            benchmark.pedantic(target, setup=stepper.clear, rounds=rounds, warmup_rounds=1)
        elif mode == "backward":
            def setup():
                stepper.clear()
                loss = stepper.step()
                sync()
                return (loss,), {}

            def target(loss):
                loss.backward()
                sync()
            benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
        else:
            def target():
                loss = stepper.step()
                loss.backward()
                sync()
            benchmark.pedantic(target, setup=stepper.clear, rounds=rounds, warmup_rounds=1)

        # One more step for the in-process peak (see the module docstring for the authoritative numbers).
        stepper.clear()
        if case.device == "cpu":
            _Glibc().tight()
            if not CpuMemory.available():
                return
        memory = CpuMemory() if case.device == "cpu" else CudaMemory(stepper.device)
        _, _, objective, fwd_peak = stepper.run(memory)
        benchmark.extra_info.update(peak_extra_mib=memory.peak_extra_mib(), fwd_peak_extra_mib=fwd_peak,
                                    objective=objective)
        stepper.clear()

    return run
