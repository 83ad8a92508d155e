"""The ablation runner: its aggregation (means, standard errors across seeds, differences paired by seed) by
hand, its output-folder rules, and its whole path end to end at tiny size."""

import json
import math

import pytest

from firempo_kernels.integrations import ablation
from firempo_kernels.integrations.ablation import CONTROL, Row

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(row, seed, accuracy, side_shrink):
    return {"row": row, "seed": seed, "eval": {"accuracy": accuracy, "sensitivity": None,
                                                "by_kind": {"side": {"margin_shrink": side_shrink}}}}


def test_aggregate_pairs_by_seed():
    rows = (Row(CONTROL, "control", "firempo", gamma=0.0), Row("g1", "gamma 1", "firempo", gamma=1.0))
    runs = {
        CONTROL: {0: _run(CONTROL, 0, 0.50, 0.0), 1: _run(CONTROL, 1, 0.70, 0.2), 2: _run(CONTROL, 2, 0.60, 0.1)},
        # seed 3 has no control: it counts in the row's mean but not in the paired difference
        "g1": {0: _run("g1", 0, 0.55, 0.5), 1: _run("g1", 1, 0.71, 0.1), 2: _run("g1", 2, 0.66, 0.4),
               3: _run("g1", 3, 0.90, 0.0)},
    }
    table = ablation.aggregate(rows, runs)
    acc = table["g1"]["measures"]["accuracy"]
    values = [0.55, 0.71, 0.66, 0.90]
    mean = sum(values) / 4
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / 3 / 4)
    assert acc["mean"] == pytest.approx(mean) and acc["se"] == pytest.approx(se) and acc["n"] == 4
    diffs = [0.05, 0.01, 0.06]  # paired with the control's seeds 0-2
    dmean = sum(diffs) / 3
    dse = math.sqrt(sum((d - dmean) ** 2 for d in diffs) / 2 / 3)
    assert acc["diff"] == pytest.approx(dmean) and acc["diff_se"] == pytest.approx(dse)
    shrink = table["g1"]["measures"]["shrink_side"]
    assert shrink["diff"] == pytest.approx((0.5 + -0.1 + 0.3) / 3)
    assert math.isnan(table[CONTROL]["measures"]["accuracy"]["diff"])  # the control is not compared with itself
    assert math.isnan(table["g1"]["measures"]["drop"]["mean"])  # a measure no run has
    text = ablation.markdown_tables(table)
    assert f"| gamma 1 | 4 | {100 * mean:.1f} ± {100 * se:.1f} |" in text
    assert f"| gamma 1 | 4 | {100 * dmean:+.1f} ± {100 * dse:.1f} |" in text


def test_out_folder_is_never_taken_over(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no ablation"):
        ablation._open_out(other, ablation.QUICK)
    assert (other / "notes.txt").read_text() == "mine"
    mine = tmp_path / "mine"
    ablation._open_out(mine, ablation.QUICK)
    ablation._open_out(mine, ablation.QUICK)  # same settings: resumed
    with pytest.raises(ValueError, match="epochs differ"):
        ablation._open_out(mine, ablation.replace(ablation.QUICK, epochs=3))


def test_command_line_errors_exit_2(tmp_path, capsys):
    assert ablation.main(["--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds must be a positive integer" in capsys.readouterr().err


def test_whole_path_at_tiny_size(tmp_path, monkeypatch):
    monkeypatch.setenv("FIREMPO_PROGRESS", "0")
    rows = (Row(CONTROL, "control", "firempo", gamma=0.0),
            Row("g1", "gamma 1, paper noise", "firempo", gamma=1.0, corruption="paper"))
    cfg = ablation.replace(ablation.QUICK, rows=rows, workers=2)  # the pool of spawned workers, as make ablation runs
    out = tmp_path / "abl"
    report = ablation.run_ablation(out, cfg)
    text = report.read_text()
    for name in ("ablation.json", "ablation.png", "prepared.json", "base/config.json", "data/pairs-inpaint.jsonl",
                 "data/pairs-paper.jsonl", "runs/gamma0/seed-1.json", "runs/g1/seed-0.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["table"]["g1"]["seeds"] == [0, 1]
    assert "| gamma 1, paper noise | 2 |" in text and "minus the gamma-0 control" in text
    # a rerun resumes: nothing is trained again and the runs' files stay as they were
    before = (out / "runs/g1/seed-0.json").read_text()
    first = summary["invocations"][0]
    assert first["runs"] == 4 and first["seconds"] >= first["runs_seconds"] > 0
    text = ablation.run_ablation(out, cfg).read_text()
    assert (out / "runs/g1/seed-0.json").read_text() == before
    # ... and its report keeps the first invocation's time: the wall time of every invocation, summed
    summary = json.loads((out / "ablation.json").read_text())
    assert [t["runs"] for t in summary["invocations"]] == [4, 0]
    spent = sum(t["seconds"] for t in summary["invocations"])
    assert summary["total_seconds"] == spent and f"in {spent / 60:.1f} minutes of wall time" in text
