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
    kind_table,
    mean_and_se,
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
        ("a-v.png", "in the right lung"): -2.5,
        ("b.png", "in the right lung"): -2.0, ("b.png", "in the left lung"): -2.0, ("b-v.png", "in the right lung"): -1.5,
        ("b-v.png", "in the left lung"): -3.0,
        ("c.png", "in the left lung"): -4.0, ("c.png", "in the right lung"): -1.0,
        ("d.png", "upper"): -0.5, ("d-v.png", "upper"): -1.0,  # drop 0.5
    }
    calls = []

    def scorer(requests):
        calls.append(len(requests))
        return [table[(r.image, r.response)] for r in requests]

    report = evaluate(records, scorer)
    assert calls == [4 + 4 + 2 + 2]  # one batched call: a and b ranked on v and v', c on v, d's answer on v and v'
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


# --- per-kind measures ----------------------------------------------------------------------------------

SIDE_WORDS, LEVEL_WORDS = ("left", "right"), ("upper", "lower")


def _synth(scan, kind, gt, corrupted=True, **kw):
    """A record shaped like the synthetic set's (its kind read from the id), on image s<scan>.png."""
    from firempo_kernels.integrations.data.synthetic import QUESTIONS

    return QARecord(id=f"synth-heldout-{scan:05d}-{kind}", image=f"s{scan}.png", question=QUESTIONS[kind],
                    ground_truth=gt, corrupted_image=f"s{scan}-v.png" if corrupted else None, **kw)


def _side(scan, side, **kw):
    return _synth(scan, "side", f"The lesion is in the {side} lung", answer_type="closed", candidates=SIDE_WORDS, **kw)


def _presence(scan, lesion, **kw):
    return _synth(scan, "presence", "There is a lesion" if lesion else "There is no lesion", answer_type="closed",
                  candidates=("a lesion", "no lesion"), **kw)


def _where(scan, level, side, **kw):
    wrong = tuple(f"The lesion is in the {lv} {sd} lung" for lv in LEVEL_WORDS for sd in SIDE_WORDS
                  if (lv, sd) != (level, side))
    return _synth(scan, "where", f"The lesion is in the {level} {side} lung", answer_type="open",
                  wrong_answers=wrong, **kw)


def _table_scorer(table, calls):
    def scorer(requests):
        calls.append(list(requests))
        return [table[(r.image, r.response)] for r in requests]  # a request the table lacks: KeyError
    return scorer


L, R = "The lesion is in the left lung", "The lesion is in the right lung"
A, NO = "There is a lesion", "There is no lesion"
UL, UR, LL, LR = (f"The lesion is in the {lv} {sd} lung" for lv in LEVEL_WORDS for sd in SIDE_WORDS)
HAND_RECORDS = [
    _side(0, "left"),  # v: -1 vs -3 right, m 2; v': -2 vs -1.5 wrong, m -0.5; drop 1
    _side(1, "right"),  # v: tie -2 wrong, m 0; v': -1 vs -4 right, m 3; drop -1
    _presence(0, True),  # v: a -1 > no -2 right, m 1; v': a -3 < no -1 wrong, "no lesion", m -2; drop 2
    _presence(1, True),  # v: tie -1 wrong, not "no lesion", m 0; v': -2 > -2.5 right, m 0.5; drop 1
    _presence(2, False),  # v: no -1 > a -2 right, m 1; v': -1 < -0.5 wrong, m -0.5; drop 0; no lesion to miss
    _where(0, "upper", "left"),  # v: -1 vs -2,-3,-4 right, m 1; v': -5 vs -2,-6,-7 wrong, m -3; drop 4
    _where(1, "lower", "right", corrupted=False),  # v: -3 vs -1,-4,-5 wrong, m -2
    QARecord(id="rad-0001", image="r1.png", question="Is it?", ground_truth="yes", candidates=("yes", "no"),
             corrupted_image="r1-v.png"),  # v: -1 < -0.5 wrong, m -0.5; v': -1 > -2 right, m 1; drop 0
    QARecord(id="rad-0002", image="r2.png", question="What is it?", ground_truth="a nodule",
             wrong_answers=("a mass",), corrupted_image="r2-v.png"),  # open, real: not ranked; drop -1
]
HAND_SCORES = {
    ("s0.png", L): -1.0, ("s0.png", R): -3.0, ("s0-v.png", L): -2.0, ("s0-v.png", R): -1.5,
    ("s1.png", R): -2.0, ("s1.png", L): -2.0, ("s1-v.png", R): -1.0, ("s1-v.png", L): -4.0,
    ("s0.png", A): -1.0, ("s0.png", NO): -2.0, ("s0-v.png", A): -3.0, ("s0-v.png", NO): -1.0,
    ("s1.png", A): -1.0, ("s1.png", NO): -1.0, ("s1-v.png", A): -2.0, ("s1-v.png", NO): -2.5,
    ("s2.png", NO): -1.0, ("s2.png", A): -2.0, ("s2-v.png", NO): -1.0, ("s2-v.png", A): -0.5,
    ("s0.png", UL): -1.0, ("s0.png", UR): -2.0, ("s0.png", LL): -3.0, ("s0.png", LR): -4.0,
    ("s0-v.png", UL): -5.0, ("s0-v.png", UR): -2.0, ("s0-v.png", LL): -6.0, ("s0-v.png", LR): -7.0,
    ("s1.png", LR): -3.0, ("s1.png", UL): -1.0, ("s1.png", UR): -4.0, ("s1.png", LL): -5.0,
    ("r1.png", "yes"): -1.0, ("r1.png", "no"): -0.5, ("r1-v.png", "yes"): -1.0, ("r1-v.png", "no"): -2.0,
    ("r2.png", "a nodule"): -2.0, ("r2-v.png", "a nodule"): -1.0,
}
NAN = float("nan")
# Expected by hand. Shares: sqrt(p (1 - p) / n). Means: sample sd / sqrt(n); for two values that is |a - b| / 2.
HAND_EXPECTED = {
    "side": dict(
        ranked=2, chance=0.5, accuracy=0.5, accuracy_se=math.sqrt(0.125),
        ranked_corrupted=2, accuracy_corrupted=0.5, accuracy_corrupted_se=math.sqrt(0.125),
        margin=1.0, margin_se=1.0,  # 2, 0
        margin_corrupted=1.25, margin_corrupted_se=1.75,  # -0.5, 3
        margin_shrink=-0.75, margin_shrink_se=2.25,  # 2 - 0.5 = 1.5, 0 - 3 = -3: more sure on v' on average
        corrupted=2, drop=0.0, drop_se=1.0,  # 1, -1
        lesion_scans=0, no_lesion_rate=NAN, no_lesion_rate_se=NAN,
        lesion_scans_corrupted=0, no_lesion_rate_corrupted=NAN, no_lesion_rate_corrupted_se=NAN,
    ),
    "presence": dict(
        ranked=3, chance=0.5, accuracy=2 / 3, accuracy_se=math.sqrt(2 / 27),
        ranked_corrupted=3, accuracy_corrupted=1 / 3, accuracy_corrupted_se=math.sqrt(2 / 27),
        # 1, 0, 1: squared deviations 1/9 + 4/9 + 1/9 = 2/3, variance 1/3, se sqrt(1/9)
        margin=2 / 3, margin_se=1 / 3,
        # -2, 0.5, -0.5: squared deviations 16/9 + 49/36 + 1/36 = 19/6, variance 19/12, se sqrt(19/36)
        margin_corrupted=-2 / 3, margin_corrupted_se=math.sqrt(19 / 36),
        # 1 - 2 = -1, 0 - 0.5 = -0.5, 1 - 0.5 = 0.5: squared deviations 4/9 + 1/36 + 25/36 = 7/6, se sqrt(7/36)
        margin_shrink=-1 / 3, margin_shrink_se=math.sqrt(7 / 36),
        corrupted=3, drop=1.0, drop_se=math.sqrt(1 / 3),  # 2, 1, 0
        lesion_scans=2, no_lesion_rate=0.0, no_lesion_rate_se=0.0,  # the tie is no "no lesion"
        lesion_scans_corrupted=2, no_lesion_rate_corrupted=0.5, no_lesion_rate_corrupted_se=math.sqrt(0.125),
    ),
    "where": dict(
        ranked=2, chance=0.25, accuracy=0.5, accuracy_se=math.sqrt(0.125),
        ranked_corrupted=1, accuracy_corrupted=0.0, accuracy_corrupted_se=0.0,
        margin=-0.5, margin_se=1.5,  # 1, -2
        margin_corrupted=-3.0, margin_corrupted_se=NAN,
        margin_shrink=-2.0, margin_shrink_se=NAN,  # |1| - |-3|
        corrupted=1, drop=4.0, drop_se=NAN,
        lesion_scans=0, no_lesion_rate=NAN, no_lesion_rate_se=NAN,
        lesion_scans_corrupted=0, no_lesion_rate_corrupted=NAN, no_lesion_rate_corrupted_se=NAN,
    ),
    "other": dict(
        ranked=1, chance=0.5, accuracy=0.0, accuracy_se=0.0,
        ranked_corrupted=1, accuracy_corrupted=1.0, accuracy_corrupted_se=0.0,
        margin=-0.5, margin_se=NAN, margin_corrupted=1.0, margin_corrupted_se=NAN,
        margin_shrink=-0.5, margin_shrink_se=NAN,
        corrupted=2, drop=-0.5, drop_se=0.5,  # 0, -1
        lesion_scans=0, no_lesion_rate=NAN, no_lesion_rate_se=NAN,
        lesion_scans_corrupted=0, no_lesion_rate_corrupted=NAN, no_lesion_rate_corrupted_se=NAN,
    ),
}


def _assert_kind(got, expected, where):
    from dataclasses import asdict

    got = asdict(got)
    assert set(got) == set(expected), where
    for key, want in expected.items():
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got[key]), f"{where}.{key}: {got[key]} is not nan"
        else:
            assert got[key] == pytest.approx(want, abs=1e-12), f"{where}.{key}: {got[key]} != {want}"


def test_kind_measures_by_hand():
    calls = []
    report = evaluate(HAND_RECORDS, _table_scorer(HAND_SCORES, calls))
    # one call; every request once: side 2 x 2 x 2, presence 3 x 2 x 2, where 4 x 2 + 4, rad-0001 2 x 2,
    # rad-0002 only its ground truth on v and v' (its wrong answer is not ranked: other data ranks closed only)
    assert len(calls) == 1 and len(calls[0]) == 8 + 12 + 12 + 4 + 2 == len(set(calls[0])) == len(HAND_SCORES)
    assert list(report.by_kind) == ["side", "presence", "where", "other"]  # level, size: no records
    for kind, expected in HAND_EXPECTED.items():
        _assert_kind(report.by_kind[kind], expected, kind)
    # the fields of before: closed records only (side, presence, rad-0001), drops of every record with v'
    assert (report.closed, report.accuracy) == (6, 0.5)
    assert report.by_question == {"Is it?": (0, 1), HAND_RECORDS[2].question: (2, 3), HAND_RECORDS[0].question: (1, 2)}
    # drops 1, -1, 2, 1, 0, 4, 0, -1: mean 0.75, squared deviations sum to 19.5
    assert report.corrupted == 8 == sum(k.corrupted for k in report.by_kind.values())
    assert report.sensitivity == pytest.approx(0.75) and report.sensitivity_drops == pytest.approx(0.5)
    assert report.sensitivity_se == pytest.approx(math.sqrt(19.5 / 7 / 8))


def test_requests_shared_by_records_are_scored_once():
    twin = [_side(0, "left"), QARecord(**{**HAND_RECORDS[0].__dict__, "id": "synth-heldout-00009-side"})]
    calls = []
    report = evaluate(twin, _table_scorer(HAND_SCORES, calls))
    assert len(calls[0]) == 4  # two records, one set of requests
    assert report.by_kind["side"].ranked == 2 and report.by_kind["side"].margin == pytest.approx(2.0)


def test_kind_measures_match_an_independent_computation():
    """Random scans and integer scores (many ties): every per-kind measure against a plain recomputation
    that builds the responses from the scans' truth (not from candidate_responses) and uses statistics."""
    import random
    import statistics

    rng = random.Random(7)
    scans = []
    records = []
    for i in range(40):
        lesion = rng.random() < 0.8
        corrupted = rng.random() < 0.75
        side, level = rng.choice(SIDE_WORDS), rng.choice(LEVEL_WORDS)
        scans.append((i, lesion, corrupted, side, level))
        if lesion:
            records += [_side(i, side, corrupted=corrupted), _where(i, level, side, corrupted=corrupted)]
        records.append(_presence(i, lesion, corrupted=corrupted))
    rng.shuffle(records)
    table = {}

    def scorer(requests):
        return [table.setdefault((r.image, r.response), float(rng.randint(-4, 0))) for r in requests]

    report = evaluate(records, scorer)

    def mean_se(xs):
        if not xs:
            return NAN, NAN
        return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else NAN

    def share(flags):
        return (NAN, NAN) if not flags else (sum(flags) / len(flags), math.sqrt(
            sum(flags) / len(flags) * (1 - sum(flags) / len(flags)) / len(flags)))

    for kind in ("side", "presence", "where"):
        acc_v, acc_c, mv, mc, shrink, drops, no_v, no_c, chance = [], [], [], [], [], [], [], [], []
        for i, lesion, corrupted, side, level in scans:
            if kind == "side" and lesion:
                other_side = "right" if side == "left" else "left"
                right, wrong = f"The lesion is in the {side} lung", [f"The lesion is in the {other_side} lung"]
            elif kind == "where" and lesion:
                right = f"The lesion is in the {level} {side} lung"
                wrong = [x for x in (UL, UR, LL, LR) if x != right]
            elif kind == "presence":
                right, wrong = (A, [NO]) if lesion else (NO, [A])
            else:
                continue
            images = [f"s{i}.png"] + ([f"s{i}-v.png"] if corrupted else [])
            for img, acc, margins in zip(images, (acc_v, acc_c), (mv, mc)):
                r, w = table[(img, right)], [table[(img, x)] for x in wrong]
                acc.append(r > max(w))
                margins.append(r - max(w))
                if kind == "presence" and lesion:
                    (no_v if img == images[0] else no_c).append(w[0] > r)
            chance.append(1 / (1 + len(wrong)))
            if corrupted:
                shrink.append(abs(mv[-1]) - abs(mc[-1]))
                drops.append(table[(images[0], right)] - table[(images[1], right)])
        k = report.by_kind[kind]
        assert (k.ranked, k.ranked_corrupted, k.corrupted, k.lesion_scans, k.lesion_scans_corrupted) == (
            len(acc_v), len(acc_c), len(drops), len(no_v), len(no_c))
        assert k.chance == pytest.approx(statistics.fmean(chance))
        for got, want in [((k.accuracy, k.accuracy_se), share(acc_v)),
                          ((k.accuracy_corrupted, k.accuracy_corrupted_se), share(acc_c)),
                          ((k.margin, k.margin_se), mean_se(mv)),
                          ((k.margin_corrupted, k.margin_corrupted_se), mean_se(mc)),
                          ((k.margin_shrink, k.margin_shrink_se), mean_se(shrink)),
                          ((k.drop, k.drop_se), mean_se(drops)),
                          ((k.no_lesion_rate, k.no_lesion_rate_se), share(no_v)),
                          ((k.no_lesion_rate_corrupted, k.no_lesion_rate_corrupted_se), share(no_c))]:
            assert got == pytest.approx(want, nan_ok=True), kind
    assert set(report.by_kind) == {"side", "presence", "where"}


def test_mean_and_se():
    import numpy as np

    # 1, 2, 3, 4: mean 2.5, squared deviations 5, sample variance 5/3
    assert mean_and_se([1, 2, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))
    assert mean_and_se(np.array([-1.0, 1.0])) == pytest.approx((0.0, 1.0))
    mean, se = mean_and_se((3.5,))
    assert mean == 3.5 and math.isnan(se)
    assert all(math.isnan(x) for x in mean_and_se([]))
    assert all(math.isnan(x) for x in mean_and_se([1.0, float("nan")]))
    with pytest.raises(TypeError, match=r"`values` must be a sequence of real numbers; got str"):
        mean_and_se("12")
    with pytest.raises(TypeError, match=r"`values\[1\]` must be a real number; got str"):
        mean_and_se([1.0, "2"])
    with pytest.raises(TypeError, match=r"`values\[0\]` must be a real number; got bool"):
        mean_and_se([True])


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="`records` must be a sequence of QARecord; got QARecord"):
        evaluate(HAND_RECORDS[0], lambda r: [])
    with pytest.raises(TypeError, match=r"`records\[1\]` must be a QARecord; got dict"):
        evaluate([HAND_RECORDS[0], {"id": "x"}], lambda r: [])
    with pytest.raises(TypeError, match="`scorer` must be callable"):
        evaluate(HAND_RECORDS, None)
    with pytest.raises(ValueError, match="finite real log-probs; got nan"):
        evaluate([HAND_RECORDS[0]], lambda r: [float("nan")] * len(r))
    with pytest.raises(TypeError, match="`reports` must be a non-empty dict"):
        kind_table({})
    with pytest.raises(TypeError, match=r"`reports\['base'\]` must be an EvalReport; got dict"):
        comparison_table({"base": {}})


def test_kind_table_and_json():
    import json

    hand = evaluate(HAND_RECORDS, _table_scorer(HAND_SCORES, []))
    fewer = evaluate([r for r in HAND_RECORDS if r.id != "synth-heldout-00001-side"], _table_scorer(HAND_SCORES, []))
    md = kind_table({"base": hand, "trained": fewer})
    lines = md.splitlines()
    assert lines[0] == "| kind / measure | base | trained |"
    assert "| **side** | | |" in lines and "| **other** | | |" in lines and "| **level** | | |" not in lines
    # shares in percent with their standard error in points; nats with theirs; a model's own count in brackets
    assert "| &nbsp;&nbsp;accuracy on v (2 records, chance 50.0%) | 50.0% ± 35.4 | 100.0% ± 0.0 (1) |" in lines
    shrink = "| &nbsp;&nbsp;less sure on v': mean abs(m_v) - abs(m_v'), nats (2 records) | -0.750 ± 2.250 | +1.500 (1) |"
    assert shrink in lines
    assert all(line.count("|") == 4 for line in lines)  # no measure's label breaks the table
    assert "| &nbsp;&nbsp;accuracy on v (2 records, chance 25.0%) | 50.0% ± 35.4 | 50.0% ± 35.4 |" in lines
    assert "| &nbsp;&nbsp;log-prob drop v -> v', nats (1 records) | +4.000 | +4.000 |" in lines
    assert "| &nbsp;&nbsp;\"no lesion\" on scans with one, v' (2 records) | 50.0% ± 35.4 | 50.0% ± 35.4 |" in lines
    assert sum('"no lesion"' in line for line in lines) == 2  # the presence question's rows only
    data = hand.to_json()
    json.dumps(data, allow_nan=False)
    assert data["by_kind"]["where"]["drop"] == 4.0 and data["by_kind"]["where"]["drop_se"] is None
    assert data["by_kind"]["presence"]["no_lesion_rate_corrupted"] == 0.5 and data["closed"] == 6


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_model_scorer_equals_the_models_own_log_probs(tmp_path, family, one_thread):
    """The summed response log-prob of ModelScorer equals the float64 log-softmax of the model's own logits;
    PaliGemma's prompt attends both ways, so the scorer must tell the adapter where each prompt ends."""
    import numpy as np
    from PIL import Image

    from firempo_kernels.integrations.data.dataset import PromptEncoder, load_image
    from firempo_kernels.integrations.data.tags import encode_response
    from firempo_kernels.integrations.smoke import tiny_model, tiny_processor

    model, processor = tiny_model(family).eval(), tiny_processor(family)
    rng = np.random.default_rng(0)
    requests = []
    for i, response in enumerate(["the lesion is left", "no lesion"]):
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(path)
        requests.append(ScoreRequest(str(path), "where is the lesion", response))
    got = ModelScorer(model, processor)(requests)
    prompts = PromptEncoder(processor)
    for req, score in zip(requests, got):
        prompt, images = prompts(req.question, load_image(req.image))
        response = list(encode_response(prompts.tokenizer, req.response, where="t").input_ids)
        ids = torch.tensor([prompt + response])
        extra = {}
        if family == "paligemma":
            extra["token_type_ids"] = torch.tensor([[0] * len(prompt) + [1] * len(response)])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **images, **extra).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(1, torch.tensor(response)[:, None]).sum()
        assert score == pytest.approx(logp.item(), rel=1e-5, abs=1e-5)


def test_command_generates_and_scores_answers(tmp_path, capsys, monkeypatch, one_thread):
    """--generate: the models answer greedily, the JSON holds the answers and their scores (those of
    score_answers on the same answers), and the table shows them; --judge without a key is refused."""
    import json

    import numpy as np
    from PIL import Image

    from firempo_kernels.integrations.data.embedded import save_embedded
    from firempo_kernels.integrations.evaluate import main
    from firempo_kernels.integrations.metrics import score_answers

    model_dir = save_embedded(tmp_path / "model")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 251).astype("uint8")).save(tmp_path / "scan.png")
    lines = [
        {"id": "c", "image": "scan.png", "question": "Is the lesion in the left or the right lung?",
         "ground_truth": "The lesion is in the left lung", "answer_type": "closed", "candidates": ["left", "right"]},
        {"id": "o", "image": "scan.png", "question": "Where is the lesion?", "ground_truth": "upper left lung",
         "answer_type": "open"},
        {"id": "r", "image": "scan.png", "question": "Describe the scan.", "ground_truth": "no lesion is seen",
         "answer_type": "open", "task": "report"},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "eval.json"
    argv = ["--data", str(tmp_path / "q.jsonl"), "--model", f"base={model_dir}", "--generate",
            "--max-new-tokens", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| generated answers | base |" in printed and "BLEU-4 (1 records)" in printed
    got = json.loads(out.read_text())["base"]
    answers = [a["answer"] for a in got["generated"]["answers"]]
    assert [a["id"] for a in got["generated"]["answers"]] == ["c", "o", "r"]
    from firempo_kernels.integrations.data.records import load_qa_records

    want = score_answers(load_qa_records(tmp_path / "q.jsonl"), answers).to_json()
    assert {k: got["generated"][k] for k in ("overall", "by_kind")} == json.loads(json.dumps(want))
    assert got["closed"] == 1  # the log-prob ranking is still there
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(argv + ["--judge", "openai:gpt-4o-mini"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert main([a for a in argv if a != "--generate"] + ["--judge", "openai:gpt-4o-mini"]) == 2
    assert "add --generate" in capsys.readouterr().err
