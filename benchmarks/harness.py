"""Measuring one case: its peak extra memory and its time, the way every number in RESULTS.md is taken.

Run as a script, it measures one case in this (fresh) process and prints one ``RESULT {json}`` line:

    python benchmarks/harness.py --case '{"workload": "loss", "method": "fused", ...}'

Order of a measurement: build the inputs; one warm-up step (forward + backward: compilation, thread pools,
first-touch of library buffers); one memory step; ``reps`` timed steps.

Time: wall clock of each step, forward and backward apart (``torch.cuda.synchronize`` around each on a GPU);
the median over the reps is reported. ``reps`` is chosen from the warm-up time so that a case takes about
``target_s`` seconds, within [min_reps, max_reps].

Peak extra memory, CPU: the peak resident set during the step minus the resident set just before it, with
the inputs built, the warm-up done and the previous gradients freed. The kernel's high-water mark is reset
by writing 5 to /proc/self/clear_refs, then read from VmHWM in /proc/self/status. For the resident set to
follow live tensors, glibc must hand freed memory back at once: the memory step runs with
``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` (every tensor larger than that is its own mapping, unmapped on free). The timed steps run with the threshold at 32 MiB, the value glibc's own dynamic
threshold settles at, so small chunk buffers are reused from the heap as in any long-running process and
page faults are not charged to the method that frees most often. The warm-up runs with the 64 KiB threshold
too, so the heap of small objects is already resident when the memory step starts. Each case runs in its own process, so no
case sees another's caches. Peak extra memory, CUDA: ``max_memory_allocated`` minus ``memory_allocated``
before the step, after ``reset_peak_memory_stats``.

Gradients produced by the step (dh, and dW when the head trains) are part of its peak: every method must
produce them.
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import Case, grad_leaves, make_inputs, make_step, skip_reason  # noqa: E402

RESULT_PREFIX = "RESULT "
MIB = 1 << 20

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class _Glibc:
    def __init__(self):
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            self.libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        except (OSError, AttributeError):
            self.libc = None

    def tight(self) -> bool:
        """Freed memory leaves the process at once (for the memory step)."""
        if self.libc is None:
            return False
        self.libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
        self.libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        return True

    def steady(self) -> None:
        """glibc's steady state for a process that frees large blocks (for the timed steps)."""
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    return out


class CpuMemory:
    """Resident-set peak of this process, reset per step through /proc/self/clear_refs."""

    def __init__(self):
        self.base = 0

    @staticmethod
    def available() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM" in _status_kib("VmHWM")
        except OSError:
            return False

    def start(self) -> None:
        self.base = _status_kib("VmRSS")["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak_extra_mib(self) -> float:
        return (_status_kib("VmHWM")["VmHWM"] - self.base) / 1024


class CudaMemory:
    def __init__(self, device):
        self.device, self.base = device, 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_extra_mib(self) -> float:
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB


def _loadavg() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return None


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in text or (
        "out of memory" in text
    )


class Stepper:
    """Runs forward and backward of one case, timing each part, and frees everything but the inputs."""

    def __init__(self, case: Case):
        self.case = case
        self.device = torch.device(case.device)
        self.inputs = make_inputs(case)
        self.step = make_step(case, self.inputs)
        self.leaves = grad_leaves(self.inputs)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, memory=None) -> tuple[float, float, float, float | None]:
        """(forward s, backward s, objective, forward-only peak MiB or None)."""
        for leaf in self.leaves:
            leaf.grad = None
        gc.collect()
        self._sync()
        if memory is not None:
            memory.start()
        t0 = time.perf_counter()
        loss = self.step()
        self._sync()
        t1 = time.perf_counter()
        fwd_peak = memory.peak_extra_mib() if memory is not None else None
        loss.backward()
        self._sync()
        t2 = time.perf_counter()
        value = float(loss.detach())
        del loss
        return t1 - t0, t2 - t1, value, fwd_peak

    def clear(self):
        for leaf in self.leaves:
            leaf.grad = None
        gc.collect()


def measure(case: Case, *, target_s: float = 8.0, min_reps: int = 3, max_reps: int = 15) -> dict:
    """Measure ``case`` in this process; returns the result record (see module docstring)."""
    record = {"case": case.to_dict(), "status": "ok", "note": ""}
    reason = skip_reason(case)
    if reason:
        return {**record, "status": "skipped", "note": reason}
    glibc = _Glibc()
    on_cpu = case.device == "cpu"
    if on_cpu and not CpuMemory.available():
        return {**record, "status": "error", "note": "/proc/self/clear_refs is not writable: no CPU peak memory"}
    record.update(
        threads=torch.get_num_threads(), torch=torch.__version__, loadavg_before=_loadavg(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        device_name=torch.cuda.get_device_name(case.device) if case.device == "cuda" else "cpu",
    )
    if case.method == "fused":
        from firempo_kernels.backend import resolve_backend

        record["backend"] = resolve_backend(torch.device(case.device), getattr(torch, case.dtype))
    try:
        # Warm-up and memory step with freed memory leaving at once; then the timed steps in glibc's steady
        # state. The warm-up also makes the small-object heap resident, so the memory step counts tensors,
        # not the re-faulting of the heap; the first timed step pays the heap's one-time growth (~ms).
        if on_cpu:
            glibc.tight()
        stepper = Stepper(case)
        w_fwd, w_bwd, _, _ = stepper.run()
        warm = w_fwd + w_bwd
        stepper.clear()
        memory = CpuMemory() if on_cpu else CudaMemory(torch.device(case.device))
        _, _, objective, fwd_peak = stepper.run(memory)
        peak = memory.peak_extra_mib()
        stepper.clear()
        if on_cpu:
            glibc.steady()
        reps = int(min(max_reps, max(min_reps, round(target_s / max(warm, 1e-6)))))
        fwd, bwd = [], []
        for _ in range(reps):
            f, b, _, _ = stepper.run()
            fwd.append(f)
            bwd.append(b)
        stepper.clear()
    except Exception as err:  # noqa: BLE001 - every failure becomes a row with its reason
        status = "oom" if _is_oom(err) else "error"
        return {**record, "status": status, "note": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    totals = [f + b for f, b in zip(fwd, bwd)]
    record.update(
        peak_extra_mib=peak,
        fwd_peak_extra_mib=fwd_peak,
        gradient_mib=case.gradient_mib,
        working_mib=peak - case.gradient_mib,
        time_ms=1e3 * statistics.median(totals),
        fwd_ms=1e3 * statistics.median(fwd),
        bwd_ms=1e3 * statistics.median(bwd),
        times_ms=[round(1e3 * t, 3) for t in totals],
        warmup_ms=1e3 * warm,
        reps=reps,
        objective=objective,
        loadavg_after=_loadavg(),
    )
    return record


def _limit_address_space(budget_gib: float) -> None:
    """Cap this process's address space at what it holds now plus ``budget_gib``: a case that needs more
    fails with an allocation error instead of waking the kernel's OOM killer on a shared machine."""
    if budget_gib <= 0:
        return
    held = _status_kib("VmSize")["VmSize"] * 1024
    limit = held + int(budget_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure one benchmark case in this process.")
    parser.add_argument("--case", required=True, help="the Case as JSON")
    parser.add_argument("--target-s", type=float, default=8.0, help="seconds of timed steps to aim for")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--max-reps", type=int, default=15)
    parser.add_argument("--mem-budget-gib", type=float, default=0.0, help="address-space cap above the start (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    case = Case.from_dict(json.loads(args.case))
    if case.device == "cpu":
        _limit_address_space(args.mem_budget_gib)
    result = measure(case, target_s=args.target_s, min_reps=args.min_reps, max_reps=args.max_reps)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
