"""Measuring cases: peak extra memory of one case in a fresh process, and the time of the methods of one
comparison group interleaved in one process. Every number in RESULTS.md is taken this way.

    python benchmarks/harness.py memory --case '{"workload": "loss", "method": "fused", ...}'
    python benchmarks/harness.py time --cases '[{...}, {...}]'

Each prints one ``RESULT {json}`` line (a list of records for ``time``). ``report`` runs the same
measurements (``measure``) in processes forked from a server that has the peers imported (``report.Workers``).

Peak extra memory, CPU (``memory``, one case per process, so no case sees another's caches): build the
inputs, one warm-up step (forward + backward: compilation, thread pools, first-touch of library buffers),
then one measured step. The peak is the largest resident set during that step minus the resident set
just before it, with the previous gradients freed: the kernel's high-water mark is reset by writing 5 to
/proc/self/clear_refs and read from VmHWM in /proc/self/status. For the resident set to follow live tensors,
glibc must hand freed memory back at once: both steps run with ``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, so
every tensor larger than that is its own mapping, unmapped when freed; since the warm-up runs so too, the
heap of small objects is already resident when the measured step starts. Peak extra memory, CUDA:
``max_memory_allocated`` minus ``memory_allocated`` before the step, after ``reset_peak_memory_stats``.
Gradients produced by the step (dh, and dW when the head trains) are part of its peak: every method must
produce them.

Time (``time``, all methods of one shape in one process): one warm-up step per method, then rounds in
which every method runs its steps, the order rotating from round to round, so that a change in the
machine's load falls on every method alike. The number of rounds is chosen from the slowest warm-up so
that it takes about ``target_s`` seconds, within [min_reps, max_reps]; a fast method runs several steps per
round (at most 5, about a second's worth). Each step is timed by the wall clock, forward and backward apart
(``torch.cuda.synchronize`` around each on a GPU); the median over all of a method's steps is reported.
The timed steps run with glibc's mmap threshold at 32 MiB, the value its own dynamic threshold settles at
in a long-running process, so chunk buffers are reused from the heap instead of being faulted in at every
step.
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


def _base_record(case: Case) -> dict:
    record = {"case": case.to_dict(), "status": "ok", "note": ""}
    reason = skip_reason(case)
    if reason:
        return {**record, "status": "skipped", "note": reason}
    record.update(
        threads=torch.get_num_threads(), torch=torch.__version__,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        device_name=torch.cuda.get_device_name(case.device) if case.device == "cuda" else "cpu",
    )
    if case.method == "fused":
        from firempo_kernels.backend import resolve_backend

        record["backend"] = resolve_backend(torch.device(case.device), getattr(torch, case.dtype))
    return record


def _failure(record: dict, err: BaseException) -> dict:
    status = "oom" if _is_oom(err) else "error"
    return {**record, "status": status, "note": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}


def measure_memory(case: Case) -> dict:
    """Peak extra memory of one step of ``case``, in this process (fresh, on the CPU)."""
    record = _base_record(case)
    if record["status"] != "ok":
        return record
    on_cpu = case.device == "cpu"
    if on_cpu and not CpuMemory.available():
        return {**record, "status": "error", "note": "/proc/self/clear_refs is not writable: no CPU peak memory"}
    record["memory_loadavg"] = _loadavg()
    try:
        if on_cpu:
            _Glibc().tight()
        stepper = Stepper(case)
        w_fwd, w_bwd, _, _ = stepper.run()
        stepper.clear()
        memory = CpuMemory() if on_cpu else CudaMemory(stepper.device)
        _, _, objective, fwd_peak = stepper.run(memory)
        peak = memory.peak_extra_mib()
        stepper.clear()
    except Exception as err:  # noqa: BLE001 - every failure becomes a row with its reason
        return _failure(record, err)
    return {**record, "peak_extra_mib": peak, "fwd_peak_extra_mib": fwd_peak, "gradient_mib": case.gradient_mib,
            "working_mib": peak - case.gradient_mib, "objective": objective, "memory_warmup_ms": 1e3 * (w_fwd + w_bwd)}


def measure_times(cases: list[Case], *, target_s: float = 5.0, min_reps: int = 3, max_reps: int = 15) -> list[dict]:
    """Median step times of ``cases`` (one comparison group), interleaved round by round in this process."""
    records = [_base_record(c) for c in cases]
    steppers: dict[int, Stepper] = {}
    warm: dict[int, float] = {}
    if any(c.device == "cpu" for c in cases):
        _Glibc().steady()
    load_before = _loadavg()
    for i, case in enumerate(cases):
        if records[i]["status"] != "ok":
            continue
        try:
            stepper = Stepper(case)
            f, b, _, _ = stepper.run()
            stepper.clear()
            steppers[i], warm[i] = stepper, f + b
        except Exception as err:  # noqa: BLE001
            records[i] = _failure(records[i], err)
    if not steppers:
        return records
    # Rounds are paced by the slowest method. A fast method runs several steps per round (at most 5, and
    # at most about a second's worth), so it gets more samples for little wall time.
    slowest = max(max(warm.values()), 1e-6)
    rounds = int(min(max_reps, max(min_reps, round(target_s / slowest))))
    per_round = {i: int(min(5, max(1, round(min(slowest, 1.0) / max(warm[i], 1e-6))))) for i in steppers}
    fwd = {i: [] for i in steppers}
    bwd = {i: [] for i in steppers}
    order = list(steppers)
    for r in range(rounds):
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:
            for _ in range(per_round[i] if i in steppers else 0):
                try:
                    f, b, _, _ = steppers[i].run()
                    steppers[i].clear()
                except Exception as err:  # noqa: BLE001
                    records[i] = _failure(records[i], err)
                    del steppers[i]
                    break
                fwd[i].append(f)
                bwd[i].append(b)
    load_after = _loadavg()
    for i in steppers:
        totals = [f + b for f, b in zip(fwd[i], bwd[i])]
        records[i].update(
            time_ms=1e3 * statistics.median(totals), fwd_ms=1e3 * statistics.median(fwd[i]),
            bwd_ms=1e3 * statistics.median(bwd[i]), times_ms=[round(1e3 * t, 3) for t in totals],
            warmup_ms=1e3 * warm[i], reps=len(totals), rounds=rounds, loadavg_before=load_before,
            loadavg_after=load_after,
            interleaved_with=[cases[j].method for j in order if j != i],
        )
    return records


def merge(memory_record: dict, time_record: dict) -> dict:
    """One row from the memory and the time measurements of the same case."""
    if memory_record["status"] != "ok":
        return memory_record
    if time_record["status"] != "ok":
        return {**memory_record, "status": time_record["status"], "note": time_record["note"]}
    return {**memory_record, **time_record}


def _limit_address_space(budget_gib: float) -> None:
    """Cap this process's address space at what it holds now plus ``budget_gib``: a case that needs more
    fails with an allocation error instead of waking the kernel's OOM killer on a shared machine."""
    if budget_gib <= 0:
        return
    held = _status_kib("VmSize")["VmSize"] * 1024
    limit = held + int(budget_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def measure(what: str, payload, *, target_s: float = 5.0, min_reps: int = 3, max_reps: int = 15,
            mem_budget_gib: float = 0.0, threads: int = 0):
    """What ``main`` measures, as a function for a process forked to run it (``report.Workers``): ``memory``
    of one case (``payload`` a Case dict) or ``time`` of one comparison group (a list of them)."""
    if threads > 0:
        torch.set_num_threads(threads)
    _limit_address_space(mem_budget_gib)
    if what == "memory":
        return measure_memory(Case.from_dict(payload))
    cases = [Case.from_dict(c) for c in payload]
    return measure_times(cases, target_s=target_s, min_reps=min_reps, max_reps=max_reps)


def send_measurement(conn, what: str, payload, options: dict, log_path: str) -> None:
    """Run :func:`measure` and send its result through ``conn`` (the child side of a pipe); this process's
    output goes to ``log_path``, whose last line explains a failure."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    conn.send(measure(what, payload, **options))
    conn.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure benchmark cases in this process.")
    parser.add_argument("what", choices=("memory", "time"))
    parser.add_argument("--case", help="memory: the Case as JSON")
    parser.add_argument("--cases", help="time: a JSON list of Cases of one comparison group")
    parser.add_argument("--target-s", type=float, default=5.0, help="seconds of timed steps per method")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--max-reps", type=int, default=15)
    parser.add_argument("--mem-budget-gib", type=float, default=0.0, help="address-space cap above the start (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    payload = json.loads(args.case if args.what == "memory" else args.cases)
    result = measure(args.what, payload, target_s=args.target_s, min_reps=args.min_reps, max_reps=args.max_reps,
                     mem_budget_gib=args.mem_budget_gib, threads=args.threads)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
