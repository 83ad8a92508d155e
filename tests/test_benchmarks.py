"""The benchmark code at tiny sizes: every method computes the same thing, the memory method measures what
it claims, the report renders and updates RESULTS.md only between its markers, and the GPU check's
CPU-runnable parts (its rehearsal through the suite's CUDA cases, its plan, product counts, import shim) work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu_check, report, workloads  # noqa: E402
from benchmarks.workloads import METHODS, Case, make_inputs, make_step, skip_reason  # noqa: E402

TINY_OP = dict(vocab=300, dim=32, tokens=50)
TINY_LOSS = dict(vocab=300, dim=32, batch=3, seq=24, response=10, spans=4)


def _run(case, inputs=None, step=None):
    inputs = inputs if inputs is not None else make_inputs(case)
    loss = (step or make_step(case, inputs))()
    loss.backward()
    grads = [inputs.hidden.grad] + ([inputs.weight.grad] if inputs.weight.requires_grad else [])
    return loss.item(), grads


def _assert_same(a, b, rtol=1e-5):
    (va, ga), (vb, gb) = a, b
    assert vb == pytest.approx(va, rel=rtol, abs=rtol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=rtol, atol=rtol * x.abs().max().item())


@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("workload", ["logprobs", "token_kl"])
def test_op_methods_compute_the_same_objective(workload, head):
    runnable = [m for m in METHODS[workload]
                if "compiled" not in m and not skip_reason(Case(workload, m, head=head, **TINY_OP))]
    assert {"fused", "naive"} <= set(runnable)
    ref = _run(Case(workload, "naive", head=head, **TINY_OP))
    for method in runnable:
        _assert_same(ref, _run(Case(workload, method, head=head, **TINY_OP)))


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_loss_methods_compute_the_same_loss(head):
    ref = _run(Case("loss", "naive", head=head, **TINY_LOSS))
    for method in ("fused", "naive_masked", "torch_lce", "cce", "trl", "liger"):
        case = Case("loss", method, head=head, **TINY_LOSS)
        assert not skip_reason(case), method
        _assert_same(ref, _run(case))


TINY_DPO = dict(vocab=300, dim=32, batch=2, seq=9)


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_dpo_methods_compute_the_same_loss(head):
    ref = _run(Case("dpo", "naive", head=head, **TINY_DPO))
    for method in METHODS["dpo"]:
        if "compiled" not in method:
            _assert_same(ref, _run(Case("dpo", method, head=head, **TINY_DPO)))


def test_compiled_liger_matches_naive():
    """Liger's chunked losses with their chunk step compiled (its default), on the CPU."""
    for workload, tiny in (("dpo", TINY_DPO), ("token_kl", TINY_OP)):
        _assert_same(_run(Case(workload, "naive", **tiny)), _run(Case(workload, "liger_compiled", **tiny)))


def test_compiled_loss_matches_naive():
    case = dict(TINY_LOSS, spans=3)
    _assert_same(_run(Case("loss", "naive", **case)), _run(Case("loss", "compiled", **case)))


def test_torch_lce_loss_takes_both_paths_of_its_rule():
    # 4 * B * spans tokens: below d the reference path, at or above it the chunked one.
    assert workloads.lce_options(12, 32) is None
    assert workloads.lce_options(32, 32) is not None
    if skip_reason(Case("loss", "torch_lce", **TINY_LOSS)):
        pytest.skip("no F.linear_cross_entropy options in this torch")
    wide = dict(TINY_LOSS, spans=8, response=10)  # 96 span tokens >= d = 32
    _assert_same(_run(Case("loss", "naive", **wide)), _run(Case("loss", "torch_lce", **wide)))


class _TorchCE(torch.nn.Module):
    """Liger's fused linear cross-entropy with reduction='none', in plain torch."""

    def __init__(self, reduction):
        super().__init__()
        assert reduction == "none"

    def forward(self, w, h, y):
        return torch.nn.functional.cross_entropy(h @ w.T, y, reduction="none")


def test_liger_log_prob_glue_matches_naive(monkeypatch):
    """The GPU-only path (Liger's Triton cross-entropy) with a torch stand-in: the glue around it."""
    import liger_kernel.transformers as lt

    monkeypatch.setattr(lt, "LigerFusedLinearCrossEntropyLoss", _TorchCE)
    case = Case("logprobs", "liger", head="trainable", **TINY_OP)
    inputs = make_inputs(case)
    got = _run(case, inputs, workloads._op_step(case, inputs))
    _assert_same(_run(Case("logprobs", "naive", head="trainable", **TINY_OP)), got)




def test_loss_inputs_have_the_documented_layout():
    case = Case("loss", "fused", **dict(TINY_LOSS, seq=40, response=12, spans=5))
    x = make_inputs(case)
    b, t = case.batch, case.seq
    assert x.hidden.shape == (4 * b, t, case.dim) and x.hidden.requires_grad
    assert not x.ref_hidden.requires_grad and x.ref_weight is x.weight  # frozen head: shared
    assert bool((x.labels[:, : t - case.response] == workloads.IGNORE).all())
    assert bool((x.labels[:, t - case.response :] >= 0).all())
    assert x.span_weights.sum(1).eq(case.spans).all()
    assert bool((x.span_weights[:, : t - case.response] == 0).all())
    # (v', y+) / (v', y-) rows carry the responses of (v, y+) / (v, y-).
    assert torch.equal(x.labels[: 2 * b], x.labels[2 * b :])
    assert torch.equal(x.span_weights[: 2 * b], x.span_weights[2 * b :])
    trainable = make_inputs(Case("loss", "fused", head="trainable", **TINY_LOSS))
    assert trainable.weight.requires_grad and not trainable.ref_weight.requires_grad
    assert torch.equal(trainable.weight.detach(), trainable.ref_weight)


def test_case_round_trips_and_rejects_nonsense():
    case = Case("loss", "compiled", **TINY_LOSS)
    assert Case.from_dict(json.loads(json.dumps(case.to_dict()))) == case
    with pytest.raises(ValueError):
        Case("token_kl", "torch_lce", **TINY_OP)
    with pytest.raises(ValueError):
        Case("loss", "fused", **dict(TINY_LOSS, spans=11))  # more spans than response tokens


def _harness(*args) -> list | dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/harness.py"), *args,
         "--target-s", "0.01", "--min-reps", "2", "--max-reps", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def test_fresh_process_peak_memory_sees_the_logits():
    # N x V fp32 logits are 16 MiB here: the naive step must show at least that much extra, the fused
    # step a small fraction of it. This is the measurement RESULTS.md rests on.
    shape = dict(vocab=4096, dim=64, tokens=1024, head="frozen")
    logits_mib = shape["tokens"] * shape["vocab"] * 4 / (1 << 20)
    naive, fused = (Case("logprobs", m, **shape) for m in ("naive", "fused"))
    mem = {c.method: _harness("memory", "--case", json.dumps(c.to_dict())) for c in (naive, fused)}
    for rec in mem.values():
        assert rec["status"] == "ok", rec
        assert rec["gradient_mib"] == pytest.approx(shape["tokens"] * shape["dim"] * 4 / (1 << 20))
    assert mem["naive"]["peak_extra_mib"] >= logits_mib
    assert mem["fused"]["peak_extra_mib"] < mem["naive"]["peak_extra_mib"] / 4
    assert mem["fused"]["objective"] == pytest.approx(mem["naive"]["objective"], rel=1e-5)

    times = _harness("time", "--cases", json.dumps([naive.to_dict(), fused.to_dict()]))
    for rec in times:
        assert rec["status"] == "ok", rec
        assert rec["rounds"] == 2 and 2 <= rec["reps"] == len(rec["times_ms"]) <= 10 and rec["time_ms"] > 0
        assert rec["fwd_ms"] > 0 and rec["bwd_ms"] > 0
    assert times[0]["interleaved_with"] == ["fused"] and times[1]["interleaved_with"] == ["naive"]
    from benchmarks.harness import merge

    row = merge(mem["naive"], times[0])
    assert row["peak_extra_mib"] == mem["naive"]["peak_extra_mib"] and row["time_ms"] == times[0]["time_ms"]


def test_forked_workers_measure_like_a_fresh_interpreter():
    """`make bench` forks its measuring processes from a server with the peers imported: the peak memory
    still sees the logits and nothing else, the timing runs, and a process that fails or hangs becomes a
    row with its reason."""
    shape = dict(vocab=4096, dim=64, tokens=1024, head="frozen")
    logits_mib = shape["tokens"] * shape["vocab"] * 4 / (1 << 20)
    profile = report.Profile([], target_s=0.01, min_reps=2, max_reps=2, case_timeout_s=120)
    workers = report.Workers(profile, threads=1)

    def fallback(status, note):
        return {"status": status, "note": note}

    naive, fused = (Case("logprobs", m, **shape) for m in ("naive", "fused"))
    mem = {c.method: workers.run("memory", c.to_dict(), cuda=False, timeout_s=120, fallback=fallback)
           for c in (naive, fused)}
    assert all(rec["status"] == "ok" for rec in mem.values()), mem
    assert mem["naive"]["peak_extra_mib"] >= logits_mib
    assert mem["fused"]["peak_extra_mib"] < mem["naive"]["peak_extra_mib"] / 4
    # The same peak in a new interpreter (cuda=True: the path CUDA groups take): nothing of the server's
    # imports is counted. Repeated memory steps agree to about 0.1 MiB; 0.5 MiB is 3% of the logits.
    fresh = workers.run("memory", naive.to_dict(), cuda=True, timeout_s=120, fallback=fallback)
    assert fresh["status"] == "ok" and abs(fresh["peak_extra_mib"] - mem["naive"]["peak_extra_mib"]) < 0.5
    times = workers.run("time", [naive.to_dict(), fused.to_dict()], cuda=False, timeout_s=120,
                        fallback=lambda status, note: [fallback(status, note)] * 2)
    assert [r["status"] for r in times] == ["ok", "ok"] and times[0]["rounds"] == 2

    bad = dict(naive.to_dict(), method="no-such-method")
    failed = workers.run("memory", bad, cuda=False, timeout_s=120, fallback=fallback)
    assert failed["status"] == "error" and "no-such-method" in failed["note"]
    hung = workers.run("memory", naive.to_dict(), cuda=False, timeout_s=0.001, fallback=fallback)
    assert hung == {"status": "timeout", "note": "over 0 s"}


def test_harness_reports_skips_without_running():
    rec = report.run_all(report.Profile([report.Section("s", "s", [Case("logprobs", "liger", **TINY_OP)])]),
                         in_process=True, budget_min=1.0, log=lambda m: None)
    assert rec[0]["status"] == "skipped" and "GPU" in rec[0]["note"]


def _record(case, peak, ms, objective=1.0):
    return {"case": case.to_dict(), "status": "ok", "note": "", "peak_extra_mib": peak, "fwd_peak_extra_mib": peak,
            "working_mib": peak - case.gradient_mib,
            "time_ms": ms, "fwd_ms": ms / 3, "bwd_ms": 2 * ms / 3, "reps": 3, "objective": objective,
            "threads": 2, "loadavg_before": 0.5, "loadavg_after": 0.7, "omp_wait_policy": "PASSIVE"}


def test_report_renders_plots_checks_and_touches_only_its_block(tmp_path):
    profile = report.cpu_profile()
    records = []
    for case in report.unique_cases(profile.sections):
        scale = case.positions * case.vocab / 1e6
        if case.method == "fused":
            records.append(_record(case, case.gradient_mib + 0.01 * scale, 0.2 * scale))
        elif case.method == "liger":
            records.append({"case": case.to_dict(), "status": "skipped", "note": "needs a GPU"})
        else:
            records.append(_record(case, 2 * case.gradient_mib + scale, scale,
                                   objective=1.0 if case.method != "compiled" else 2.0))
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"# Results\n\nhand-written intro\n\n{report.BEGIN}\nold table\n{report.END}\n\nnotes\n")
    out = tmp_path / "report"
    report.write_outputs(profile, records, out, "make bench", results_md)

    text = results_md.read_text()
    assert "hand-written intro" in text and "notes" in text and "old table" not in text
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "](report/vs_vocab.png)" in text and "](report/vs_span_tokens.png)" in text
    for name in ("report.md", "results.json", "vs_vocab.png", "vs_span_tokens.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| **fused** |" in md and "skipped: needs a GPU" in md and "OMP_WAIT_POLICY=PASSIVE" in md
    assert "disagree" in md and "compiled" in md  # the planted objective mismatch is flagged
    checks = json.loads((out / "results.json").read_text())["checks"]
    assert len(checks) == len(report.CPU_CHECKS)
    assert {c["result"] for c in checks} <= {"pass", "MISS"}
    # Fused working memory at 1% and time at 20% of every baseline's: the working-memory and time checks pass.
    assert all(c["result"] == "pass" for c in checks if c["quantity"] in ("working_mib", "time_ms"))


def test_checks_compare_the_right_rows():
    a = Case("loss", "fused", 32000, 512, batch=2, seq=512, response=32, spans=16, regime="vqa")
    b = Case("loss", "naive", 32000, 512, batch=2, seq=512, response=32, spans=16, regime="vqa")
    checks = [c for c in report.CPU_CHECKS if c[0].startswith("loss, VQA")]
    res = report.evaluate_checks(checks, [_record(a, 3.0, 30.0), _record(b, 100.0, 100.0)])
    by = {r["check"]: r for r in res}
    assert by["loss, VQA (16 span tokens/row): peak <= 2% of naive"]["result"] == "MISS"  # 3%
    assert by["loss, VQA: time <= 0.25x naive"]["result"] == "MISS"  # 0.30x
    res = report.evaluate_checks(checks, [_record(a, 1.0, 20.0), _record(b, 100.0, 100.0)])
    assert {r["result"] for r in res} == {"pass"}
    assert report.evaluate_checks(checks, [])[0]["result"] == "not measured"


@pytest.mark.interpreter
def test_gpu_check_smoke_passes_and_writes_its_files(tmp_path):
    """The rehearsal ``bash benchmarks/gpu_check.sh --smoke`` runs: the suite's CUDA cases at small shapes on
    CPU tensors, the kernels under the interpreter (in this process, which has it on)."""
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--seed", "7"]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    kc = gpu_check.kernel_cases()
    assert [r["case"] for r in data["correctness"]] == [kc.small(c).name for c in kc.CASES if c.regime == "split"]
    assert {(r["dtype"], r["op"], r["head"], r["softcap"] is None) for r in data["correctness"]} == {
        ("float32", "token_kl", "trained", True), ("float32", "logprobs", "frozen", False),
        ("bfloat16", "logprobs", "trained", True), ("bfloat16", "token_kl", "frozen", False)}
    assert all(r["passed"] for r in data["correctness"]) and data["env"]["kernels"] == "interpreted"
    assert "| pass |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_plan_is_the_suite_cases_then_the_shape_sweep():
    kc = gpu_check.kernel_cases()
    plan = gpu_check.correctness_plan()
    assert plan[:len(kc.CASES)] == kc.CASES
    sweep = plan[len(kc.CASES):]
    assert {(c.vocab, c.dim, c.tokens) for c in sweep} == {
        (v, d, n) for v in (151936, 262144) for d in (2560, 3584) for n in (64, 512, 8192)}
    assert {(c.dtype, c.op, c.head, c.softcap is not None) for c in sweep} == {
        (dt, op, head, capped) for dt in ("float32", "bfloat16")
        for op, head, capped in (("token_kl", "trained", False), ("logprobs", "frozen", True))}


def test_gpu_check_counts_the_products_of_each_op():
    from benchmarks.gemm_floor import token_kl_cost

    for workload, with_ref in (("token_kl", True), ("logprobs", False)):
        for trains in (True, False):
            products = gpu_check.op_products(workload, 512, 151936, 3584, trains)
            flops = sum(2 * m * k * n for m, k, n in products)
            assert flops == token_kl_cost(512, 151936, 3584, head_trains=trains, with_ref=with_ref).flops
    assert len(gpu_check.op_products("token_kl", 8, 100, 4, False, rebuild=False)) == 3  # s, t, dh


def test_gpu_check_imports_the_package_from_a_bare_checkout():
    # A GPU machine gets the working tree without the editable install: hide the install, import from files.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()"
        " and 'editable' not in repr(f).lower()]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from benchmarks.gpu_check import ensure_importable\n"
        "print(ensure_importable())\n"
        "import firempo_kernels.csrc_triton as k, firempo_kernels as fk\n"
        "assert k.__file__.endswith('csrc_triton/__init__.py') and hasattr(fk, 'fused_linear_token_kl')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd="/", env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "checkout"


def test_busy_check_table_and_block(tmp_path, monkeypatch):
    """The busy-machine table from measured rows, written between its own markers only."""
    from benchmarks import busy_check

    rows = [{"shape": "dpo", "baseline": "naive", "quiet": {"fused": 120.0, "naive": 100.0},
             "busy": {"fused": 300.0, "naive": 150.0}}]
    for r in rows:
        r["quiet_ratio"] = r["quiet"]["fused"] / r["quiet"]["naive"]
        r["busy_ratio"] = r["busy"]["fused"] / r["busy"]["naive"]
        r["change"] = r["busy_ratio"] / r["quiet_ratio"]
    table = busy_check.render(rows, 5)
    assert "| dpo | naive | 120 ms | 100 ms | 1.20x | 300 ms | 150 ms | 2.00x | 1.67 | NO |" in table
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"intro\n{report.BEGIN}\nsuite\n{report.END}\nnotes\n")
    report.update_results_md(results_md, table, busy_check.BEGIN, busy_check.END)
    report.update_results_md(results_md, table, busy_check.BEGIN, busy_check.END)  # replaced, not appended
    text = results_md.read_text()
    assert text.count(busy_check.BEGIN) == 1 and f"{report.BEGIN}\nsuite\n{report.END}" in text and "notes" in text


def test_merge_completes_a_cut_run_and_from_results_renders_it_again(tmp_path, capsys):
    """A run cut by its time budget says which sections it left and the command that measures them;
    --merge completes it section by section (keeping the other sections' records), and --from-results
    renders the tables again without measuring."""
    out, md = tmp_path / "report", tmp_path / "RESULTS.md"
    common = ["--profile", "tiny", "--in-process", "--out", str(out), "--results-md", str(md)]
    assert report.main(common + ["--budget-min", "-1"]) == 0  # spent before the first group
    assert "report.py --only ops spans --merge" in capsys.readouterr().out
    assert report.main(common + ["--only", "ops"]) == 0
    first = json.loads((out / "results.json").read_text())["records"]
    assert report.main(common + ["--only", "spans", "--merge"]) == 0
    merged = json.loads((out / "results.json").read_text())
    workloads_seen = {r["case"]["workload"] for r in merged["records"]}
    assert workloads_seen == {"logprobs", "token_kl", "loss"}
    assert [r for r in merged["records"] if r["case"]["workload"] != "loss"] == first
    assert "--merge" in merged["command"]
    (out / "report.md").unlink()
    assert report.main(["--profile", "tiny", "--from-results", str(out / "results.json"), "--out", str(out),
                        "--no-results-md"]) == 0
    assert "tiny spans" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as bad:
        report.main(["--profile", "tiny", "--from-results", str(tmp_path / "missing.json"), "--out", str(out)])
    assert bad.value.code == 2
