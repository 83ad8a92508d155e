"""The demo's pieces: base-model warm-up, run config, curves, report; and its whole path on tiny sizes with
training run in-process (the 2-rank ``deepspeed`` launch itself is what ``make demo`` runs)."""

import json
import math
import random
from pathlib import Path

from firempo_kernels.integrations import demo
from firempo_kernels.integrations.base_model import blind_answer
from firempo_kernels.integrations.data.records import QARecord
from firempo_kernels.integrations.evaluate import EvalReport


def test_blind_answer_keeps_the_format_and_draws_the_key():
    rec = QARecord(id="a", image="x", question="q", ground_truth="The lesion is in the left lung",
                   candidates=("left", "right"))
    seen = {blind_answer(rec, random.Random(i)) for i in range(20)}
    assert seen == {"The lesion is in the left lung", "The lesion is in the right lung"}
    open_rec = QARecord(id="b", image="x", question="q", ground_truth="upper", wrong_answers=("lower",))
    assert {blind_answer(open_rec, random.Random(i)) for i in range(20)} == {"upper", "lower"}


def _report(acc, by_question, sens, se, drops=0.5, n=100):
    return EvalReport(accuracy=acc, closed=n, sensitivity=sens, sensitivity_drops=drops, sensitivity_se=se,
                      corrupted=n, by_question=by_question)


def test_verdicts_say_what_moved_and_what_did_not():
    base = _report(0.5, {"side?": (25, 50), "size?": (20, 50)}, 0.0, 0.01)
    trained = _report(0.7, {"side?": (26, 50), "size?": (45, 50)}, 0.01, 0.01)
    text = "\n".join(demo.verdicts(base, trained))
    assert "from 50.0% to 70.0% (+20.0 points on 100 held-out records" in text and "it moved" in text
    assert "'side?': 25/50 -> 26/50, did not move beyond noise" in text
    assert "'size?': 20/50 -> 45/50, improved" in text
    assert "from +0.000 to +0.010 nats" in text and "within noise, it did not move" in text
    # an image-blind model: v and v' score alike up to rounding, with a standard error of the same size
    blind = "\n".join(demo.verdicts(_report(0.5, {}, -2e-7, 1e-8), _report(0.5, {}, 3e-7, 1e-8)))
    assert "within noise, it did not move" in blind


def test_curves_and_report(tmp_path):
    rows = [{"step": s, "loss": 0.7 - 0.001 * s, "rewards/margins": 0.01 * s, "rewards/accuracies": 0.5 + 0.002 * s,
             "kl/forward": 0.003 * s, "kl/reverse": None if s == 3 else 0.002 * s} for s in range(1, 41)]
    png = demo.plot_curves(rows, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = _report(0.5, {"side?": (25, 50)}, 0.0, 0.01)
    facts = dict(total_s=100.0, train_s=50.0, steps=40, train_records=10, heldout_records=5, parameters=1234,
                 warmup_first=3.0, warmup_last=0.5, pairs_summary="10 pairs",
                 evidence={"paper": "| kind | paper table |", "inpaint": "| kind | inpaint table |"})
    from firempo_kernels.integrations.data.records import QARecord
    from firempo_kernels.integrations.metrics import score_answers

    asked = [QARecord(id="synth-heldout-00000-side", image="x.png", question="Is the lesion in the left or the right lung?",
                      ground_truth="The lesion is in the left lung", answer_type="closed", candidates=("left", "right"))]
    answers = {"base": score_answers(asked, ["The lesion is in the right lung"]),
               "trained": score_answers(asked, ["The lesion is in the left lung"])}
    text = demo.write_report(tmp_path, demo.QUICK, facts, rows, rep, rep, png, answers).read_text()
    assert "![training curves](curves.png)" in text
    assert "| loss | 0.6975 | 0.6615 |" in text  # means of steps 1-4 and 37-40
    assert "| closed-question accuracy (100 records) | 50.0% | 50.0% |" in text
    assert "## What moved and what did not" in text
    assert "**v' = paper**\n\n| kind | paper table |" in text and "**v' = inpaint**" in text
    assert "| kind / measure | base | trained |" in text  # the per-kind table of both models
    # the generated answers' table: a wrong then a right closed answer
    closed_row = next(line for line in text.splitlines() if "closed accuracy, generated" in line)
    assert "| 0.0 ± 0.0 | 100.0 ± 0.0 |" in closed_row, closed_row


def test_margins_paragraph_states_numbers_without_a_verdict():
    text = demo.margins_paragraph(0.01, 0.48, -0.01, -0.47)
    assert "+0.010 -> +0.480" in text and "-0.010 -> -0.470" in text
    assert "lost" not in text and "did not come from" not in text
    assert "never ran" in demo.margins_paragraph(0.0, 0.1, float("nan"), float("nan"))


def test_whole_path_on_tiny_sizes(tmp_path, monkeypatch, capsys):
    from firempo_kernels.integrations import train

    def in_process(recipe, ranks, log_path):
        # One process instead of the 2-rank launcher: the same entry point, recipe and outputs.
        import yaml

        assert ranks == 1
        config = yaml.safe_load(Path(recipe).read_text())
        assert config["deepspeed"] == "zero3" and config["data_path"].endswith("pairs.jsonl")
        assert train.main(["--config", str(recipe)]) == 0

    monkeypatch.setattr(demo, "launch_training", in_process)
    monkeypatch.setenv("FIREMPO_PROGRESS", "0")
    tiny = demo.DemoConfig(train_images=2, heldout_images=2, warmup_steps=1, warmup_batch=4, ranks=1, epochs=1,
                           micro_batch_size=2, max_new_tokens=4)
    report = demo.run_demo(tmp_path / "demo", tiny)
    out = tmp_path / "demo"
    for name in ("metrics.jsonl", "eval.json", "curves.png", "report.md", "recipe.yaml", "data/pairs.jsonl",
                 "data/heldout.jsonl", "base/config.json", "train/final/config.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(k in rows[0] for k in demo.TRAIN_CURVES)
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {"base", "trained", "generated", "config"}
    heldout_ids = [json.loads(x)["id"] for x in (out / "data/heldout.jsonl").read_text().splitlines()]
    for name in ("base", "trained"):
        assert list(evals["generated"][name]["answers"]) == heldout_ids
        assert evals["generated"][name]["scores"]["overall"]["answered"] == len(heldout_ids)
    assert 0.0 <= evals["trained"]["accuracy"] <= 1.0 and math.isfinite(evals["base"]["sensitivity"])
    printed = capsys.readouterr().out
    assert f"wrote the training curves to {out / 'curves.png'}" in printed
    assert report == out / "report.md"


def test_generated_verdict_names_what_the_answers_did_and_a_ranking_it_disagrees_with():
    from firempo_kernels.integrations.data.records import QARecord
    from firempo_kernels.integrations.metrics import score_answers

    sides = ["left", "right"] * 10
    asked = [QARecord(id=f"synth-heldout-{i:05d}-side", image="x.png", question="Is the lesion in the left or the right lung?",
                      ground_truth=f"The lesion is in the {side} lung", answer_type="closed", candidates=("left", "right"))
             for i, side in enumerate(sides)]
    said_right = score_answers(asked, [f"The lesion is in the {side} lung" for side in sides])
    collapsed = score_answers(asked, ["The lesion is large"] * len(asked))  # names no candidate
    ranking_up = (_report(0.5, {}, 0.0, 0.01), _report(0.9, {}, 0.0, 0.01))
    text = demo.generated_verdict(said_right, collapsed, *ranking_up)
    assert "closed accuracy of the generated answer 100.0% -> 0.0% (got worse)" in text
    assert "per kind: side 100.0% -> 0.0% (got worse)" in text
    assert "ranks the right candidate first more often without saying it" in text
    # answers that improved with the ranking: no disagreement to report
    text = demo.generated_verdict(collapsed, said_right, *ranking_up)
    assert "0.0% -> 100.0% (improved)" in text and "without saying it" not in text
