"""Evaluation metrics on cases computed by hand, and the model scorer against full logits."""

import math

import pytest
import torch

from firempo_kernels.integrations.data.records import QARecord
from firempo_kernels.integrations.evaluate import (
    EvalReport,
    ModelScorer,
    ScoreRequest,
    candidate_responses,
    comparison_table,
    evaluate,
)

SIDE = dict(question="Left or right?", answer_type="closed", candidates=("left", "right"))


def _rec(rid, gt, corrupted=True, **kw):
    fields = {**SIDE, **kw}
    return QARecord(id=rid, image=f"{rid}.png", ground_truth=gt,
                    corrupted_image=f"{rid}-v.png" if corrupted else None, **fields)


def test_candidates_replace_the_right_phrase():
    rec = _rec("a", "The lesion is in the Left lung")
    assert candidate_responses(rec) == [("left", "The lesion is in the Left lung"), ("right", "The lesion is in the Right lung")]
    assert candidate_responses(_rec("b", "no side named")) is None
    assert candidate_responses(QARecord(id="o", image="x", question="q", ground_truth="x")) is None


def test_metrics_by_hand():
    records = [
        _rec("a", "in the left lung"),  # left -1 > right -2: right; v' -3: drop 2
        _rec("b", "in the right lung"),  # tie -2 = -2: counted wrong; v' -1.5: drop -0.5
        _rec("c", "in the left lung", corrupted=False),  # left -4 < right -1: wrong; no v'
        QARecord(id="d", image="d.png", question="Where?", ground_truth="upper", corrupted_image="d-v.png"),  # open
    ]
    table = {
        ("a.png", "in the left lung"): -1.0, ("a.png", "in the right lung"): -2.0, ("a-v.png", "in the left lung"): -3.0,
        ("b.png", "in the right lung"): -2.0, ("b.png", "in the left lung"): -2.0, ("b-v.png", "in the right lung"): -1.5,
        ("c.png", "in the left lung"): -4.0, ("c.png", "in the right lung"): -1.0,
        ("d.png", "upper"): -0.5, ("d-v.png", "upper"): -1.0,  # drop 0.5
    }
    calls = []

    def scorer(requests):
        calls.append(len(requests))
        return [table[(r.image, r.response)] for r in requests]

    report = evaluate(records, scorer)
    assert calls == [6 + 2 + 2 + 2]  # one batched call
    assert report.accuracy == pytest.approx(1 / 3) and report.closed == 3
    assert report.sensitivity == pytest.approx((2.0 - 0.5 + 0.5) / 3) and report.corrupted == 3
    assert report.sensitivity_drops == pytest.approx(2 / 3)
    # drops 2, -0.5, 0.5: mean 2/3, squared deviations 16/9 + 49/36 + 1/36 = 19/6, sample variance 19/12
    assert report.sensitivity_se == pytest.approx(math.sqrt(19 / 12 / 3))
    assert report.by_question == {"Left or right?": (1, 3)}
    md = comparison_table({"base": report, "trained": report})
    assert "| closed-question accuracy (3 records) | 33.3% | 33.3% |" in md
    assert "| visual sensitivity, nats (3 records) | +0.667 | +0.667 |" in md


def test_empty_and_bad_scorer():
    report = evaluate([], lambda r: [])
    assert math.isnan(report.accuracy) and math.isnan(report.sensitivity) and report.to_json()["accuracy"] is None
    with pytest.raises(ValueError, match="returned 1 scores for 4 requests"):
        evaluate([_rec("a", "left")], lambda r: [0.0])
    assert isinstance(report, EvalReport)


def test_model_scorer_equals_full_logits(tmp_path):
    from PIL import Image

    from firempo_kernels.integrations.data.dataset import PromptEncoder, load_image
    from firempo_kernels.integrations.data.embedded import build_processor, build_tiny_llava

    processor = build_processor()
    model = build_tiny_llava(processor.tokenizer, seed=int(torch.randint(0, 1000, ())))
    for i in range(3):
        Image.fromarray(torch.randint(0, 256, (32, 32), dtype=torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    requests = [
        ScoreRequest(str(tmp_path / "0.png"), "Where is the lesion?", "The lesion is in the upper left lung"),
        ScoreRequest(str(tmp_path / "1.png"), "Is the lesion large or small?", "The lesion is small"),
        ScoreRequest(str(tmp_path / "2.png"), "Is there a lesion in this scan?", "There is no lesion"),
    ]
    got = ModelScorer(model, processor, batch_size=2)(requests)
    prompts = PromptEncoder(processor)
    tok = processor.tokenizer
    for req, score in zip(requests, got):
        prompt, images = prompts(req.question, load_image(req.image))
        response = tok(req.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **images).logits.double()
        logp = logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        assert score == pytest.approx(float(logp[len(prompt) - 1 :].sum()), rel=1e-5, abs=1e-5)
