"""Does the fused path keep its ratio to naive when another process competes for the cores?

    .venv/bin/python benchmarks/busy_check.py [--rounds N]   (about 10 minutes on a 2-core CPU)

Users train on shared machines. For shapes like the suite's, fused and its baseline are timed interleaved (one
process, the methods of a shape alternating round by round, as in ``harness``), first on the quiet machine,
then while a competitor runs: a process doing dense fp32 matrix products on as many threads as the machine
has cores, the load another user's job puts on it. The ratio fused / baseline is compared between the two,
and the busy ratio should stay within 1.5x the quiet one (``LIMIT``). The table replaces the
generated block of RESULTS.md between this script's markers.
"""

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402
from benchmarks.workloads import Case  # noqa: E402

BEGIN, END = "<!-- BEGIN GENERATED: benchmarks/busy_check.py -->", "<!-- END GENERATED: benchmarks/busy_check.py -->"
LIMIT = 1.5  # busy ratio / quiet ratio

COMPETITOR = """
import torch
torch.set_num_threads({threads})
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""


def shapes() -> list[tuple[str, list[Case]]]:
    v, d = 32000, 512
    pair = ("fused", "naive")
    out = []
    for head in ("trainable", "frozen"):
        out.append((f"dpo, B = 2 x 512 tokens, head {head}",
                    [report._dpo(m, v, d, 2, 512, head) for m in pair]))
    for op in ("logprobs", "token_kl"):
        out.append((f"{op}, N = 2048, head frozen", [Case(op, m, v, d, head="frozen", tokens=2048) for m in pair]))
    out.append(("loss, VQA, B = 2", [report._loss(m, v, d, 2, 512, 16, 32, "vqa") for m in ("fused", "naive_masked")]))
    return out


def time_group(cases: list[Case], rounds: int) -> dict[str, float]:
    profile = report.Profile([], target_s=0.0, min_reps=rounds, max_reps=rounds, case_timeout_s=300)
    recs = report.Workers(profile).run("time", [c.to_dict() for c in cases], cuda=False, timeout_s=600,
                                       fallback=lambda status, note: [{"status": status, "note": note}] * len(cases))
    if any(r.get("status") != "ok" for r in recs):
        raise RuntimeError(f"timing failed: {recs}")
    return {r["case"]["method"]: r["time_ms"] for r in recs}


def run(rounds: int, log=print) -> list[dict]:
    rows = []
    for label, cases in shapes():
        quiet = time_group(cases, rounds)
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(threads=os.cpu_count())],
                                      env=report.worker_env())
        try:
            time.sleep(2)  # let it reach its loop
            busy = time_group(cases, rounds)
        finally:
            competitor.kill()
            competitor.wait()
        base = cases[1].method
        row = {"shape": label, "baseline": base, "quiet": quiet, "busy": busy,
               "quiet_ratio": quiet["fused"] / quiet[base], "busy_ratio": busy["fused"] / busy[base]}
        row["change"] = row["busy_ratio"] / row["quiet_ratio"]
        log(f"{label}: quiet {row['quiet_ratio']:.2f}x, busy {row['busy_ratio']:.2f}x ({row['change']:.2f})")
        rows.append(row)
    return rows


def render(rows: list[dict], rounds: int) -> str:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = report.machine_info([])
    lines = [
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, fp32, {date}; "
        f"`.venv/bin/python benchmarks/busy_check.py --rounds {rounds}`; medians of {rounds} interleaved rounds; "
        f"the competitor: dense fp32 products on {machine['cores']} threads.",
        "",
        "| shape | baseline | quiet: fused | baseline | ratio | busy: fused | baseline | ratio | busy / quiet ratio "
        f"| within {LIMIT}x |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        b = r["baseline"]
        lines.append(
            f"| {r['shape']} | {b} | {r['quiet']['fused']:,.0f} ms | {r['quiet'][b]:,.0f} ms | {r['quiet_ratio']:.2f}x "
            f"| {r['busy']['fused']:,.0f} ms | {r['busy'][b]:,.0f} ms | {r['busy_ratio']:.2f}x | {r['change']:.2f} "
            f"| {'yes' if r['change'] <= LIMIT else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results-md", type=Path, default=report.RESULTS_MD)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    table = render(run(args.rounds), args.rounds)
    print(table)
    report.update_results_md(args.results_md, table, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
