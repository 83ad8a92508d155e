"""`make bench`: every method on the same inputs, peak memory and time, tables, plots and RESULTS.md.

    .venv/bin/python benchmarks/report.py [--profile cpu|gpu|tiny] [--only SECTION ...] [--out DIR]

Runs the grid of the profile (each case in a fresh process on the CPU; see ``harness`` for how memory and
time are taken), then writes into ``--out`` (default ``benchmarks/report/``):

- ``report.md``: machine, date, command, one table per section with the ratios of the fused method to
  every baseline measured in the same run, and the acceptance checks;
- ``results.json``: every measurement, with the load average around each case;
- ``vs_vocab.png``, ``vs_span_tokens.png``: peak extra memory and time against the vocabulary size and
  against the number of span tokens per row;

and replaces the generated block of ``benchmarks/RESULTS.md`` (between its markers) with the tables.
The cpu profile measures for 15-30 minutes on a 2-core machine (faster when its host is quiet, ~30 when
the host is loaded); ``--budget-min`` (11) stops starting new comparison groups once spent, and the longest
group takes up to 4 minutes, so `make bench` ends within 15 minutes. The groups it did not reach say "not run"
and are measured by ``--only SECTION ... --merge``, which keeps the other sections' records.
"""

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import METHOD_NOTES, METHODS, Case, skip_reason  # noqa: E402
from firempo_kernels.integrations.cli import atomic_write, write_whole  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- BEGIN GENERATED: benchmarks/report.py -->", "<!-- END GENERATED -->"
COMMAND = "make bench  (= .venv/bin/python benchmarks/report.py)"
METHOD_COLORS = {"fused": "C0", "naive": "C3", "naive_masked": "C1", "compiled": "C2", "torch_lce": "C4",
                 "liger": "C5", "liger_compiled": "C6", "cce": "C7", "trl": "C8"}


@dataclass
class Section:
    name: str
    title: str
    cases: list[Case]
    sweep: str | None = None  # "vocab" or "spans": plotted against that field
    note: str = ""


@dataclass
class Profile:
    sections: list[Section]
    target_s: float = 5.0
    min_reps: int = 3
    max_reps: int = 15
    case_timeout_s: float = 300.0
    checks: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------
# The grids
# ------------------------------------------------------------------------------------------------------
def _loss(method, vocab, dim, batch, seq, spans, response, regime, head="frozen", dtype="float32", device="cpu"):
    return Case("loss", method, vocab, dim, dtype=dtype, head=head, device=device, batch=batch, seq=seq,
                response=response, spans=spans, regime=regime)


def _ops(workloads, methods, vocab, dim, tokens, heads, dtype="float32", device="cpu"):
    return [
        Case(w, m, vocab, dim, dtype=dtype, head=h, device=device, tokens=tokens)
        for w in workloads for h in heads for m in methods[w]
    ]


def _dpo(method, vocab, dim, batch, seq, head, dtype="float32", device="cpu"):
    return Case("dpo", method, vocab, dim, dtype=dtype, head=head, device=device, batch=batch, seq=seq,
                response=seq, spans=seq, regime="dense")


def cpu_profile() -> Profile:
    """The suite's shapes with every peer that runs on a CPU, most important first (a spent time budget
    leaves the last groups "not run"). Sized so that every peer, the slowest included (each round of a
    group runs every method, and each method runs 6 steps: 2 in its memory process, 4 timed), fits `make
    bench` in 15 minutes on 2 cores: N = 512 for the ops, one DPO pair of 256-token rows. TRL's chunked
    divergence alone takes 13 s a step at N = 1024 here."""
    v, d, t = 32000, 512, 512
    ops_methods = {"logprobs": ("fused", "naive", "torch_lce", "cce", "trl", "liger"),
                   "token_kl": ("fused", "naive", "trl", "liger", "liger_compiled")}
    ops = Section(
        "ops", "Core ops, N = 512, V = 32000, d = 512, fp32, forward + backward",
        _ops(("logprobs", "token_kl"), ops_methods, v, d, 512, ("trainable", "frozen")),
        note="torch.compile of the naive op is in the pytest-benchmark suite; it is left out here to keep "
             "`make bench` under 15 minutes.",
    )
    dpo_methods = ("fused", "naive", "compiled", "torch_lce", "cce", "trl", "liger", "liger_compiled")
    dpo = Section(
        "dpo", "Sequence-level DPO (the dpo preset), B = 1 pair, T = 256 response tokens per row, V = 32000, "
               "d = 512, fp32, forward + backward",
        [_dpo(m, v, d, 1, 256, h) for h in ("trainable", "frozen") for m in dpo_methods],
    )
    all_loss = ("fused", "naive", "naive_masked", "compiled", "torch_lce", "cce", "trl", "liger", "liger_compiled")
    # VQA answers: a long image + prompt prefix, a short answer, one tagged phrase of 16 tokens per row.
    vqa = dict(vocab=v, dim=d, batch=2, seq=t, spans=16, response=32, regime="vqa")
    loss = Section(
        "loss", "FiRe-MPO loss step (4 policy + 4 reference blocks), VQA: B = 2, T = 512, 16 span tokens per "
                "row, d = 512, V = 32000, head frozen, fp32, forward + backward",
        [_loss(m, **vqa) for m in all_loss],
    )
    spans = Section(
        "spans", "Loss step against span tokens per row: B = 1, T = 512, V = 32000, d = 512, head frozen, fp32",
        [_loss(m, v, d, 1, t, s, max(32, s), "vqa" if s == 16 else f"spans{s}")
         for s in (4, 16, 64, 256) for m in ("fused", "naive_masked")],
        sweep="spans",
        note="The peers that run the head on span tokens only (naive-masked and those of the loss section) grow "
             "with the span count as we do; naive does not depend on it (the loss section's row).",
    )
    vocab = Section(
        "vocab", "Loss step against vocabulary size, VQA regime: B = 1, T = 256, 16 span tokens per row, d = 512, "
                 "head frozen, fp32",
        [_loss(m, vv, d, 1, 256, 16, 32, "vqa") for vv in (8000, 32000, 151936)
         for m in ("fused", "naive", "naive_masked")],
        sweep="vocab",
        note="B = 1 and T = 256 keep the naive method's [4 * 256, 151936] fp32 tensors (0.6 GB each) within "
             "this machine and its step within the time budget.",
    )
    return Profile([ops, dpo, loss, spans, vocab], checks=CPU_CHECKS)


def tiny_profile() -> Profile:
    """Seconds, not minutes: exercises every code path of the report (the smoke test)."""
    v, d = 512, 32
    ops = Section("ops", "tiny ops", _ops(("logprobs", "token_kl"),
                                          {"logprobs": ("fused", "naive", "torch_lce"), "token_kl": ("fused", "liger")},
                                          v, d, 64, ("frozen",)))
    spans = Section("spans", "tiny spans", [_loss(m, v, d, 1, 32, s, 16, f"s{s}") for s in (4, 16)
                                            for m in ("fused", "naive")], sweep="spans")
    return Profile([ops, spans], target_s=0.05, min_reps=2, max_reps=3, case_timeout_s=120)


def gpu_profile() -> Profile:
    """Real shapes in bf16 on a GPU: V = 151936, d in {2560, 3584}."""
    v = 151936
    ops_methods = {"logprobs": ("fused", "naive", "torch_lce", "liger"), "token_kl": ("fused", "naive", "liger")}
    ops = []
    for d in (2560, 3584):
        for n in (512, 8192):
            ops += _ops(("logprobs", "token_kl"), ops_methods, v, d, n, ("frozen",), dtype="bfloat16", device="cuda")
    ops += _ops(("logprobs", "token_kl"), ops_methods, v, 3584, 8192, ("trainable",), dtype="bfloat16",
                device="cuda")
    all_loss = ("fused", "naive", "naive_masked", "compiled", "torch_lce", "liger")
    kw = dict(vocab=v, dim=3584, batch=2, seq=1024, dtype="bfloat16", device="cuda")
    loss = [_loss(m, spans=16, response=32, regime="vqa", **kw) for m in all_loss]
    loss += [_loss(m, spans=1024, response=1024, regime="dense", **kw) for m in all_loss if m != "compiled"]
    return Profile(
        [Section("ops", "Core ops, V = 151936, bf16, forward + backward", ops),
         Section("loss", "FiRe-MPO loss step, B = 2, T = 1024, d = 3584, V = 151936, head frozen, bf16", loss)],
        target_s=0.5, min_reps=5, max_reps=50, case_timeout_s=120,
    )


PROFILES = {"cpu": cpu_profile, "tiny": tiny_profile, "gpu": gpu_profile}


# ------------------------------------------------------------------------------------------------------
# Acceptance checks (CPU): (description, select fused, select baseline, quantity, threshold)
# ------------------------------------------------------------------------------------------------------
def _sel(workload, methods, head="frozen", regime="", vocab=32000, batch=None):
    """Records of ``workload`` whose method is one of ``methods`` (a name or a tuple of names)."""
    methods = (methods,) if isinstance(methods, str) else methods

    def match(c: dict) -> bool:
        return (c["workload"] == workload and c["method"] in methods and c["head"] == head
                and c["vocab"] == vocab and (not regime or c["regime"] == regime)
                and (batch is None or c["batch"] == batch) and c["device"] == "cpu")
    return match


# The suite's shapes, each against every peer that runs there: fused at or below the fastest peer's time,
# and at most 10% of the peak of the leanest peer that holds full-vocabulary logits of its tokens.
PEERS = {w: tuple(m for m in methods if m != "fused") for w, methods in METHODS.items()}
# Cut Cross-Entropy's torch_compile implementation (its CPU one) holds [N, V] logits inside its graph, as its
# peak shows (1.4x an N x V fp32 tensor); its Triton kernels on a GPU do not.
FULL_LOGITS = {"logprobs": ("naive", "compiled", "cce"), "token_kl": ("naive", "compiled"),
               "dpo": ("naive", "compiled", "cce"), "loss": ("naive", "naive_masked", "compiled", "cce")}
SUITE_SHAPES = [(op, head, {}) for op in ("logprobs", "token_kl", "dpo") for head in ("trainable", "frozen")]
SUITE_SHAPES += [("loss", "frozen", {"regime": "vqa", "batch": 2})]

CPU_CHECKS = []
for _w, _head, _where in SUITE_SHAPES:
    _name = f"{_w}{', VQA' if _where else ''}, head {_head}"
    CPU_CHECKS += [
        (f"{_name}: time <= the fastest peer's", _sel(_w, "fused", _head, **_where),
         _sel(_w, PEERS[_w], _head, **_where), "time_ms", 1.0),
        # Working memory (peak - the gradients every method returns): with a trained head dW alone is 62.5 MiB,
        # more than 10% of some full-logits peaks here, and no method can return less.
        (f"{_name}: working memory <= 10% of the leanest full-logits peer's", _sel(_w, "fused", _head, **_where),
         _sel(_w, FULL_LOGITS[_w], _head, **_where), "working_mib", 0.10),
    ]
CPU_CHECKS += [
    ("loss, VQA (16 span tokens/row): peak <= 2% of naive", _sel("loss", "fused", regime="vqa", batch=2),
     _sel("loss", "naive", regime="vqa", batch=2), "peak_extra_mib", 0.02),
    ("loss, VQA: time <= 0.25x naive", _sel("loss", "fused", regime="vqa", batch=2),
     _sel("loss", "naive", regime="vqa", batch=2), "time_ms", 0.25),
]


def evaluate_checks(checks, records: list[dict]) -> list[dict]:
    """Each check against the best (smallest) of the baselines it selects that were measured."""
    ok = [r for r in records if r.get("status") == "ok"]
    out = []
    for desc, pick_fused, pick_base, quantity, threshold in checks:
        fused = next((r for r in ok if pick_fused(r["case"])), None)
        base = min((r for r in ok if pick_base(r["case"])), key=lambda r: r[quantity], default=None)
        if fused is None or base is None:
            out.append({"check": desc, "ratio": None, "threshold": threshold, "result": "not measured"})
            continue
        ratio = fused[quantity] / base[quantity] if base[quantity] > 0 else float("inf")
        out.append({
            "check": desc, "ratio": ratio, "threshold": threshold, "result": "pass" if ratio <= threshold else "MISS",
            "fused": fused[quantity], "baseline": base[quantity], "quantity": quantity,
            "baseline_method": base["case"]["method"],
        })
    return out


# ------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------
def _meminfo_gib(key: str) -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def worker_env() -> dict:
    """The environment of each measuring process.

    OMP_WAIT_POLICY=PASSIVE: on a machine whose cores are shared with other work, OpenMP threads that spin
    at every barrier waiting for a descheduled peer turned a 0.3 s loss step into 2-5 s (measured here),
    and hit a method in proportion to how many parallel regions it runs: the chunked paths far more than
    the few huge ops of the naive one. Sleeping waits keep the comparison about the methods. A value the
    caller has set is kept."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


# What a measuring process would otherwise import itself: torch, this library and the peers take 5-15 s per
# process on 2 cores (TRL's chunked divergence brings in transformers), and `make bench` starts ~75 of them.
PRELOAD = ("benchmarks.harness", "firempo_kernels", "cut_cross_entropy", "trl.kernels",
           "trl.kernels.chunked_divergence", "liger_kernel.chunked_loss")


class Workers:
    """Runs each measurement in a fresh process; its result, or ``fallback(status, note)``.

    CPU measurements run in processes forked from one server that has imported ``PRELOAD`` (the
    ``forkserver`` start method): each is as fresh as a new interpreter, nothing measured before it in the
    same process, without paying the imports. CUDA measurements start a new interpreter (``harness.py``),
    since a CUDA context does not survive a fork and a peer's import may create one.
    """

    def __init__(self, profile: Profile, mem_budget_gib: float = 0.0, threads: int = 0):
        self.options = {"target_s": profile.target_s, "min_reps": profile.min_reps, "max_reps": profile.max_reps,
                        "mem_budget_gib": mem_budget_gib, "threads": threads}
        self._context = None

    def run(self, what: str, payload, *, cuda: bool, timeout_s: float, fallback):
        """``what`` = "memory" (``payload`` a Case dict) or "time" (a list of them)."""
        if cuda:
            return self._interpreter(what, payload, timeout_s, fallback)
        return self._fork(what, payload, timeout_s, fallback)

    def _forkserver(self):
        if self._context is None:
            import multiprocessing

            os.environ.update(worker_env())  # the server, and each process forked from it, inherit it
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(list(PRELOAD))
        return self._context

    def _fork(self, what, payload, timeout_s, fallback):
        import tempfile

        from benchmarks import harness

        ctx = self._forkserver()
        receive, send = ctx.Pipe(duplex=False)
        with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
            proc = ctx.Process(target=harness.send_measurement, args=(send, what, payload, self.options, log.name))
            proc.start()
            send.close()
            try:
                if not receive.poll(timeout_s):
                    return fallback("timeout", f"over {timeout_s:.0f} s")
                return receive.recv()
            except EOFError:  # the process died before sending: killed (out of memory) or crashed
                proc.join()
                return _died(proc.exitcode, log.read(), fallback)
            finally:
                if proc.is_alive():
                    proc.kill()
                proc.join()
                receive.close()

    def _interpreter(self, what, payload, timeout_s, fallback):
        o = self.options
        cmd = [sys.executable, str(HERE / "harness.py"), what, "--case" if what == "memory" else "--cases",
               json.dumps(payload), "--target-s", str(o["target_s"]), "--min-reps", str(o["min_reps"]),
               "--max-reps", str(o["max_reps"]), "--mem-budget-gib", f"{o['mem_budget_gib']:.2f}",
               "--threads", str(o["threads"])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=worker_env())
        except subprocess.TimeoutExpired:
            return fallback("timeout", f"over {timeout_s:.0f} s")
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        return _died(proc.returncode, proc.stderr or proc.stdout, fallback)


def _died(exit_code: int, output: str, fallback):
    """``fallback`` for a measuring process that ended without a result: its last line of output says why."""
    tail = output.strip().splitlines()[-1:] or [f"exit status {exit_code}"]
    return fallback("oom" if exit_code in (-9, 137) else "error", tail[0][:300])


def measure_group(group: list[Case], profile: Profile, workers: Workers | None) -> list[dict]:
    """Records for the runnable cases of one comparison group (same shape, several methods): the memory of
    each in its own fresh process, then the time of all of them interleaved in one process (``workers``
    None: all in this process)."""
    from benchmarks import harness

    if workers is None:
        memory = [harness.measure_memory(c) for c in group]
        times = harness.measure_times(group, target_s=profile.target_s, min_reps=profile.min_reps,
                                      max_reps=profile.max_reps)
        return [harness.merge(m, t) for m, t in zip(memory, times)]
    cuda = any(c.device == "cuda" for c in group)
    memory = [
        workers.run("memory", c.to_dict(), cuda=cuda, timeout_s=profile.case_timeout_s,
                    fallback=lambda status, note, c=c: {"case": c.to_dict(), "status": status, "note": note})
        for c in group
    ]
    times = workers.run(
        "time", [c.to_dict() for c in group], cuda=cuda, timeout_s=profile.case_timeout_s * len(group),
        fallback=lambda status, note: [{"case": c.to_dict(), "status": status, "note": note} for c in group],
    )
    return [harness.merge(m, t) for m, t in zip(memory, times)]


def unique_cases(sections: list[Section]) -> list[Case]:
    seen, out = set(), []
    for s in sections:
        for c in s.cases:
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def comparison_groups(cases: list[Case]) -> list[list[Case]]:
    """Cases of the same shape (all methods), in first-seen order."""
    groups: dict = {}
    for c in cases:
        groups.setdefault(_group_key(c.to_dict()), []).append(c)
    return list(groups.values())


def run_all(profile: Profile, *, in_process: bool, budget_min: float, log=print, threads: int = 0) -> list[dict]:
    groups = comparison_groups(unique_cases(profile.sections))
    start = time.monotonic()
    workers = None if in_process else Workers(profile, min(12.0, 0.6 * _meminfo_gib("MemAvailable")), threads)
    records = []
    for g, group in enumerate(groups, 1):
        first = group[0]
        label = f"[{g}/{len(groups)}] {first.workload} {first.regime or ''} {first.head} {first.shape_label()}"
        runnable = []
        for case in group:
            reason = skip_reason(case)  # decided here: no process to start
            if reason:
                records.append({"case": case.to_dict(), "status": "skipped", "note": reason})
                log(f"{label} {case.method}: skipped ({reason})")
            elif (time.monotonic() - start) / 60 > budget_min:
                records.append({"case": case.to_dict(), "status": "not run",
                                "note": f"time budget ({budget_min} min) spent"})
                log(f"{label} {case.method}: not run (time budget)")
            else:
                runnable.append(case)
        if not runnable:
            continue
        t0 = time.monotonic()
        for rec in measure_group(runnable, profile, workers):
            records.append(rec)
            method = rec["case"]["method"]
            if rec["status"] == "ok":
                log(f"{label} {method}: {rec['peak_extra_mib']:.1f} MiB, {rec['time_ms']:.1f} ms "
                    f"(median of {rec['reps']})")
            else:
                log(f"{label} {method}: {rec['status']} ({rec.get('note', '')})")
        log(f"{label}: {time.monotonic() - t0:.0f} s")
    return records


# ------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------
def machine_info(records: list[dict]) -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = sorted({r.get("device_name") for r in records if r.get("device_name") not in (None, "cpu")})
    loads = [r[k] for r in records for k in ("loadavg_before", "loadavg_after") if r.get(k) is not None]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(_meminfo_gib("MemTotal"), 1),
        "gpu": ", ".join(gpus) or None, "torch": torch.__version__, "python": platform.python_version(),
        "threads": next((r["threads"] for r in records if "threads" in r), torch.get_num_threads()),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_range": [min(loads), max(loads)] if loads else None,
        "omp_wait_policy": next((r["omp_wait_policy"] for r in records if r.get("omp_wait_policy")), None),
    }


def _fmt(x, digits=1):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    if r < 0.1:  # two decimals where a threshold sits (2%, 5%, 10%)
        return f"{100 * r:.2f}%"
    return f"{100 * r:.1f}%" if r < 0.995 else f"{r:.2f}x"


def _group_key(c: dict):
    return (c["workload"], c["regime"], c["head"], c["dtype"], c["device"], c["vocab"], c["dim"], c["tokens"],
            c["batch"], c["seq"], c["spans"], c["response"])


def section_table(section: Section, by_case: dict) -> str:
    lines = [
        "| workload | shape | head | method | peak extra MiB | of it gradients | fwd ms | bwd ms | fwd+bwd ms "
        "| fused mem / this | fused time / this | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict = {}
    for c in section.cases:
        groups.setdefault(_group_key(c.to_dict()), []).append(c)
    for cases in groups.values():
        recs = [by_case[c] for c in cases]
        fused = next((r for r in recs if r["case"]["method"] == "fused" and r["status"] == "ok"), None)
        for r in recs:
            c = r["case"]
            shape = Case.from_dict(c).shape_label() + (f" ({c['regime']})" if c["regime"] else "")
            ok = r["status"] == "ok"
            is_fused = c["method"] == "fused"
            mem_ratio = "-" if is_fused or not ok or not fused else _ratio(fused["peak_extra_mib"], r["peak_extra_mib"])
            time_ratio = "-" if is_fused or not ok or not fused else _ratio(fused["time_ms"], r["time_ms"])
            status = "ok" if ok else f"{r['status']}: {r.get('note', '')}"
            name = f"**{c['method']}**" if is_fused else c["method"]
            lines.append(
                f"| {c['workload']} | {shape} | {c['head']} | {name} | {_fmt(r.get('peak_extra_mib'))} | "
                f"{_fmt(Case.from_dict(c).gradient_mib) if ok else '-'} | {_fmt(r.get('fwd_ms'))} | "
                f"{_fmt(r.get('bwd_ms'))} | {_fmt(r.get('time_ms'))} | {mem_ratio} | "
                f"{time_ratio} | {status} |"
            )
    return "\n".join(lines)


def checks_table(results: list[dict]) -> str:
    lines = ["| check | fused | baseline | ratio | threshold | result |", "|---|---:|---|---:|---:|---|"]
    for r in results:
        unit = " ms" if r.get("quantity") == "time_ms" else " MiB"
        ratio = "-" if r["ratio"] is None else (f"{100 * r['ratio']:.2f}%" if r["threshold"] < 1 else f"{r['ratio']:.2f}x")
        thr = f"{100 * r['threshold']:.0f}%" if r["threshold"] < 1 else f"{r['threshold']:.2f}x"
        lines.append(f"| {r['check']} | {_fmt(r.get('fused'))}{unit if r['ratio'] is not None else ''} | "
                     f"{_fmt(r.get('baseline'))}{unit if r['ratio'] is not None else ''}"
                     f"{' (' + r['baseline_method'] + ')' if r.get('baseline_method') else ''} | {ratio} | {thr} | "
                     f"{r['result']} |")
    return "\n".join(lines)


def peer_summary_table(records: list[dict]) -> str:
    """One row per suite shape, one column per peer: "fused time / peer time (peer's peak)"; above 1x the peer
    is faster. The README shows this table."""
    peers = [m for m in METHOD_COLORS if m != "fused"]
    lines = ["| workload (V = 32000, d = 512), fused peak | " + " | ".join(peers) + " |",
             "|---|" + "---:|" * len(peers)]
    ok = [r for r in records if r.get("status") == "ok"]
    for workload, head, where in SUITE_SHAPES:
        rows = [r for r in records if _sel(workload, METHODS[workload], head, **where)(r["case"])]
        fused = next((r for r in ok if r in rows and r["case"]["method"] == "fused"), None)
        if fused is None:
            continue
        cells = []
        for peer in peers:
            rec = next((r for r in rows if r["case"]["method"] == peer), None)
            if rec is None:
                cells.append("-")
            elif rec["status"] != "ok":
                cells.append(rec["status"])
            else:
                cells.append(f"{_ratio(fused['time_ms'], rec['time_ms'])} ({_fmt(rec['peak_extra_mib'])} MiB)")
        label = Case.from_dict(fused["case"]).shape_label().replace(f" V={fused['case']['vocab']} d=512", "")
        lines.append(f"| {workload} {label}, head {head}, {_fmt(fused['peak_extra_mib'])} MiB | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def render(profile: Profile, records: list[dict], machine: dict, command: str) -> str:
    by_case = {Case.from_dict(r["case"]): r for r in records}
    reps = sorted({r["reps"] for r in records if r.get("status") == "ok"})
    load = machine["loadavg_range"]
    out = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM"
        + (f"; GPU: {machine['gpu']}" if machine["gpu"] else "")
        + f"; torch {machine['torch']}, {machine['threads']} threads"
        + (f" (OMP_WAIT_POLICY={machine['omp_wait_policy']})" if machine["omp_wait_policy"] else "")
        + f", Python {machine['python']}.",
        f"Date: {machine['date']}. Command: `{command}`.",
        f"Every time is the median of {reps[0] if reps else '-'}-{reps[-1] if reps else '-'} timed steps after one "
        "warm-up step, forward and backward measured apart, the methods of one shape interleaved round by round in "
        "one process; every peak is the extra memory of one step over what the inputs already hold, each case in "
        "a fresh process (CPU) or from the allocator (CUDA); ratios are to baselines from this same run on the "
        "same inputs and dtype."
        + (f" Load average during the run: {load[0]:.1f}-{load[1]:.1f} on {machine['cores']} cores." if load else ""),
        "",
        "Methods: " + "; ".join(f"`{k}`: {v}" for k, v in METHOD_NOTES.items()) + ".",
    ]
    for s in profile.sections:
        out += ["", f"#### {s.title}", "", section_table(s, by_case)]
        if s.note:
            out += ["", s.note]
    if profile.checks:
        out += ["", "#### Every peer at the suite's shapes", "", peer_summary_table(records),
                "", "#### Acceptance checks", "", checks_table(evaluate_checks(profile.checks, records))]
    bad = _disagreements(records)
    if bad:
        out += ["", "Objective values that disagree with the fused method on the same inputs: " + "; ".join(bad)]
    return "\n".join(out) + "\n"


def _disagreements(records: list[dict], rtol: float = 1e-3) -> list[str]:
    """Every method computes the same objective from the same inputs; flag any that does not."""
    groups: dict = {}
    for r in records:
        if r.get("status") == "ok":
            groups.setdefault(_group_key(r["case"]), []).append(r)
    bad = []
    for recs in groups.values():
        fused = next((r for r in recs if r["case"]["method"] == "fused"), None)
        if fused is None:
            continue
        for r in recs:
            a, b = fused["objective"], r["objective"]
            if abs(a - b) > rtol * max(1.0, abs(a)):
                bad.append(f"{r['case']['method']} {Case.from_dict(r['case']).shape_label()}: {b:.6g} vs {a:.6g}")
    return bad


def plot(section: Section, records: list[dict], path: Path, machine: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_case = {Case.from_dict(r["case"]): r for r in records}
    x_of = (lambda c: c.vocab) if section.sweep == "vocab" else (lambda c: c.spans)
    series: dict = {}
    floor: dict = {}
    for c in section.cases:
        r = by_case.get(c)
        if r and r.get("status") == "ok":
            series.setdefault(c.method, []).append((x_of(c), r["peak_extra_mib"], r["time_ms"]))
            floor[x_of(c)] = c.gradient_mib
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in [m for m in METHOD_NOTES if m in series]:
        pts = sorted(series[method])
        xs = [p[0] for p in pts]
        style = dict(marker="o", color=METHOD_COLORS[method], label=method,
                     linewidth=2.8 if method == "fused" else 1.4, zorder=3 if method == "fused" else 2)
        axes[0].plot(xs, [p[1] for p in pts], **style)
        axes[1].plot(xs, [p[2] for p in pts], **style)
    fx = sorted(floor)
    axes[0].plot(fx, [floor[x] for x in fx], linestyle="--", color="0.4", linewidth=1,
                 label="gradients (dh), every method")
    xlabel = "vocabulary size V" if section.sweep == "vocab" else "span tokens per row (of T = 512)"
    for ax, ylabel in zip(axes, ("peak extra memory (MiB)", "forward + backward (ms, median)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(fx, [str(x) for x in fx])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cores']} cores"
    fig.suptitle(f"{section.title}\n{where}, torch {machine['torch']}, {machine['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)
    plt.close(fig)
    return True


def update_results_md(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between ``begin`` and ``end`` in ``path`` (appending the markers when missing);
    written to a temporary file and renamed, so an interrupted run leaves the old file whole."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if begin not in text or end not in text.split(begin, 1)[1]:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_whole(path, f"{head}{begin}\n{block.rstrip()}\n{end}{tail}")


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG at ``path``, written whole (``atomic_write``)."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")


def write_outputs(profile: Profile, records: list[dict], out_dir: Path, command: str,
                  results_md: Path | None, machine: dict | None = None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine or machine_info(records)
    text = render(profile, records, machine, command)
    plots = []
    for s in profile.sections:
        if s.sweep:
            name = f"vs_{'vocab' if s.sweep == 'vocab' else 'span_tokens'}.png"
            if plot(s, records, out_dir / name, machine):
                plots.append(name)
    if plots:
        text += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    write_whole(out_dir / "report.md", "# Benchmark report\n\n" + text)
    write_whole(out_dir / "results.json", json.dumps(
        {"machine": machine, "command": command, "records": records,
         "checks": [{k: v for k, v in c.items()} for c in evaluate_checks(profile.checks, records)]},
        indent=1,
    ))
    if results_md is not None:
        rel = os.path.relpath(out_dir, results_md.parent)
        linked = text.replace("](vs_", f"]({rel}/vs_")
        update_results_md(results_md, linked)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    parser.add_argument("--out", type=Path, default=HERE / "report")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="file whose generated block to replace")
    parser.add_argument("--no-results-md", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (CUDA allocator stats)")
    parser.add_argument("--budget-min", type=float, default=11.0,
                        help="start no comparison group after this many minutes (the longest takes up to 4)")
    parser.add_argument("--command", default=COMMAND, help="the command recorded with the numbers")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per case (0: torch's default)")
    parser.add_argument("--from-results", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: render the tables, checks and plots again from a results.json")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: keep the other sections' records of OUT/results.json (a run that a "
                             "time budget cut can be completed section by section)")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]()
    whole = list(profile.sections)
    if args.only:
        unknown = set(args.only) - {s.name for s in profile.sections}
        if unknown:
            parser.error(f"unknown sections {sorted(unknown)}; have {[s.name for s in profile.sections]}")
        profile.sections = [s for s in profile.sections if s.name in args.only]
    saved = None
    if args.from_results or args.merge:
        source = args.from_results or args.out / "results.json"
        try:
            saved = json.loads(source.read_text())
            saved["records"], saved["machine"], saved["command"]
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"{'--from-results' if args.from_results else '--merge'}: cannot read {source}: {e}")
    results_md = None if args.no_results_md else args.results_md
    t0 = time.monotonic()
    if args.from_results:
        write_outputs(profile, saved["records"], args.out, saved["command"], results_md, saved["machine"])
        print(f"wrote {args.out}/report.md" + (f" and {results_md}" if results_md else ""))
        return 0
    records = run_all(profile, in_process=args.in_process, budget_min=args.budget_min,
                      log=lambda m: print(m, flush=True), threads=args.threads)
    command = args.command
    if args.merge:
        fresh = {Case.from_dict(r["case"]) for r in records if r["status"] != "not run"}
        kept = [r for r in saved["records"] if Case.from_dict(r["case"]) not in fresh]
        records = kept + [r for r in records if r["status"] != "not run"]
        profile.sections = whole
        command = f"{saved['command']}; then {args.command} --only {' '.join(args.only or [])} --merge"
    write_outputs(profile, records, args.out, command, results_md)
    print(f"wrote {args.out}/report.md" + (f" and {results_md}" if results_md else "")
          + f" in {(time.monotonic() - t0) / 60:.1f} min")
    unfinished = sections_not_run(profile.sections, records)
    if unfinished:
        print(f"not run (time budget): {', '.join(unfinished)}; to measure them and keep the rest: "
              f".venv/bin/python benchmarks/report.py --only {' '.join(unfinished)} --merge")
    return 0


def sections_not_run(sections: list[Section], records: list[dict]) -> list[str]:
    """Names of the sections with a case that a spent time budget left unmeasured, in the profile's order."""
    waiting = {Case.from_dict(r["case"]) for r in records if r["status"] == "not run"}
    return [s.name for s in sections if waiting.intersection(s.cases)]


if __name__ == "__main__":
    sys.exit(main())
