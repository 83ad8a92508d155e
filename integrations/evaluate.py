"""Evaluation of a (vision-)language model on held-out question records, base and trained side by side.

Every measure comes from response log-probabilities (the sum over the response's tokens, EOS included,
given the image and the question; computed from hidden states with the fused op, no logits):

* **closed-question accuracy** by log-prob ranking: for a closed record, each candidate is put in place of
  the right one in the ground-truth answer (``"The lesion is in the left lung"`` -> ``... right lung``); the
  record counts as right when the ground truth scores strictly above every other candidate (a tie is wrong);
* **visual sensitivity**: how much the ground-truth answer's log-prob drops when the lesion is corrupted,
  ``log p(answer | v, q) - log p(answer | v', q)``, averaged over records with a corrupted image (in nats;
  larger means the answer depends more on the lesion), with the share of records where it drops at all;
* **per question kind** (:class:`KindReport`, the synthetic set's side, level, size, presence and where
  questions, and "other" for real data): accuracy on v and on v' (the right answer is still v's), the
  margin of the right answer over the best wrong one on v and on v' and how much nearer zero it gets
  (less sure on v'), the drop above, the presence question's "no lesion" rate on scans that have a lesion,
  and the where question ranked against its known wrong answers. Where v' removes the lesion, side, level
  and size have no right answer on v': a larger drop there can mean a confidently wrong model, which is
  why the accuracy and margins on v' stand beside it. :func:`kind_table` puts models side by side, and
  :func:`mean_and_se` aggregates a measure across seeds.

With ``--generate`` the models also answer greedily (:func:`generate_and_score`), and the answers are scored as
papers score them (:mod:`.metrics`): exact match and recall of open answers, closed accuracy of the generated
answers, an LLM judge's accuracy (``--judge openai:MODEL``), BLEU-1..4, ROUGE-L and METEOR on reports; per kind, each
with its standard error (:func:`~.metrics.answer_table`).

Command line::

    python -m firempo_kernels.integrations.evaluate --data heldout.jsonl --model base=runs/x/base \\
        --model trained=runs/x/final [--out metrics.json] [--generate [--judge openai:gpt-4o-mini]]
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .data._progress import progress
from .data.dataset import PromptEncoder, load_image
from .data.editors import find_candidates, replace_spans
from .data.records import QARecord, load_qa_records
from .data.synthetic import QUESTION_KINDS, question_kind
from .data.tags import encode_response
from .cli import check_writable_file, run_command, write_whole
from .llm_client import DEFAULT_BASE_URL, DEFAULT_KEY_ENV, AnswerJudge, ChatClient, parse_llm_spec
from .metrics import AnswerReport, Judge, answer_table, mean_and_se, score_answers
from .metrics import share as _share


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``response`` (plain text, no tags) as the answer to ``question`` about the image at ``image``."""

    image: str
    question: str
    response: str


Scorer = Callable[[Sequence[ScoreRequest]], list[float]]
"""Anything returning, per request, the summed log-probability of the response tokens (EOS included)."""


def response_token_logprobs(
    model: Any, adapter: Any, rows: Sequence[tuple[list[int], list[int], Mapping[str, torch.Tensor]]], pad_token_id: int
) -> torch.Tensor:
    """Per-token log-probabilities of each row's response given its prompt, from hidden states (no logits).

    Args:
        model, adapter: the model and its :func:`~.models.get_adapter` adapter.
        rows: ``(prompt ids, response ids, vision inputs)`` per row, as :class:`~.data.dataset.PromptEncoder`
            gives the prompt and its vision inputs; the rows are right-padded with ``pad_token_id``.

    Returns:
        float32 ``[R, T - 1]`` on the model's device: position t holds log p(token t + 1) where that token is
        a response token, 0 elsewhere; differentiable when the model is.
    """
    from firempo_kernels import fused_linear_logprobs

    device = next(model.parameters()).device
    length = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, -100)
    for i, (p, r, _) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        targets[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    images = {k: torch.cat([im[k] for _, _, im in rows]).to(device) for k in rows[0][2]}
    prompt_lengths = torch.tensor([len(p) for p, _, _ in rows], device=device)  # PaliGemma's prefix
    hidden = adapter.hidden_states(model, ids.to(device), mask.to(device), images, prompt_lengths=prompt_lengths)
    weight, bias = adapter.head(model)
    # hidden state t predicts token t + 1
    return fused_linear_logprobs(hidden[:, :-1].contiguous(), weight, targets[:, 1:].contiguous().to(device), bias=bias)


class ModelScorer:
    """Scores responses with a Hugging Face model through its adapter and the fused log-prob op.

    Args:
        model: a model :func:`~firempo_kernels.integrations.models.get_adapter` supports, in eval mode.
        processor: its processor (or tokenizer), see :class:`~.data.dataset.PromptEncoder`.
        prompt_template: see :class:`~.data.dataset.PromptEncoder`.
        batch_size: rows per model call.
    """

    def __init__(self, model: Any, processor: Any, *, prompt_template: str | None = None, batch_size: int = 32):
        from .models import get_adapter

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ModelScorer: `batch_size` must be a positive int; got {batch_size!r}")
        self.model = model
        self.adapter = get_adapter(model)
        self.prompts = PromptEncoder(processor, prompt_template=prompt_template)
        self.batch_size = batch_size

    def _rows(self, req: ScoreRequest):
        prompt, images = self.prompts(req.question, load_image(req.image))
        response = encode_response(self.prompts.tokenizer, req.response, where=f"response {req.response!r}")
        return prompt, list(response.input_ids), images

    @torch.no_grad()
    def __call__(self, requests: Sequence[ScoreRequest]) -> list[float]:
        scores: list[float] = []
        pad = self.prompts.tokenizer.pad_token_id or 0
        chunks = [requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        for chunk in progress(chunks, total=len(chunks), desc="scoring answers", unit="batch"):
            logp = response_token_logprobs(self.model, self.adapter, [self._rows(r) for r in chunk], pad)
            scores += logp.sum(dim=1).double().cpu().tolist()
        return scores


def candidate_responses(record: QARecord) -> list[tuple[str, str]] | None:
    """``(candidate, response)`` pairs for ranking a closed record; the ground truth's candidate first.

    None when the record is not closed or its ground truth names no single candidate.
    """
    if not record.candidates or record.ground_truth is None:
        return None
    said = find_candidates(record.candidates, record.ground_truth)
    if len(said) != 1:
        return None
    (right, spans), = said.items()
    others = [c for c in record.candidates if c != right]
    return [(right, record.ground_truth)] + [(c, replace_spans(record.ground_truth, spans, c)) for c in others]


OTHER_KIND = "other"
"""The :attr:`EvalReport.by_kind` key of records whose kind :func:`~.data.synthetic.question_kind` does not
know (real data)."""

PRESENCE_CANDIDATES = ("a lesion", "no lesion")
"""The presence question's candidates: a presence record whose right candidate is the first is a scan with a
lesion, and its "no lesion" rate compares the second against it."""


@dataclass
class KindReport:
    """What :func:`evaluate` measured on the records of one question kind (one model).

    v is the clean image, v' the lesion-corrupted one. A record is *ranked* when it is closed (its
    candidates put in place of the right one, see :func:`candidate_responses`) or, for the synthetic
    ``where`` question, when it has known ``wrong_answers`` (the ground truth against each of them). The
    right response is always the ground truth of v, also when ranking with v'. A ranking is right when the
    right response scores strictly above every other one (a tie is wrong). The margin of a ranked record given
    an image is ``m = log p(right | img) - max over the other responses of log p(other | img)``, in nats.

    Measures on v are over the ``ranked`` records, measures on v' and the paired ones over the
    ``ranked_corrupted`` records (those of them with v'). Means come with the standard error
    ``sample standard deviation / sqrt(n)`` (nan for n < 2), shares with ``sqrt(p (1 - p) / n)``; a measure
    with no record is nan.
    """

    ranked: int = 0  #: records ranked on v
    chance: float = math.nan  #: mean over ranked records of 1 / responses ranked: a blind guess's accuracy
    accuracy: float = math.nan  #: share of ranked records right on v
    accuracy_se: float = math.nan
    ranked_corrupted: int = 0  #: ranked records with v', ranked on v' too
    accuracy_corrupted: float = math.nan  #: share of them right on v' (right = the ground truth of v)
    accuracy_corrupted_se: float = math.nan
    margin: float = math.nan  #: mean margin m on v
    margin_se: float = math.nan
    margin_corrupted: float = math.nan  #: mean margin m on v'
    margin_corrupted_se: float = math.nan
    margin_shrink: float = math.nan  #: mean of |m_v| - |m_v'|: positive when the model is less sure on v'
    margin_shrink_se: float = math.nan
    corrupted: int = 0  #: records with a ground truth and v' (ranked or not): those of ``drop``
    drop: float = math.nan  #: mean log p(ground truth | v) - log p(ground truth | v'), nats
    drop_se: float = math.nan
    lesion_scans: int = 0  #: presence records of scans with a lesion, ranked on v
    no_lesion_rate: float = math.nan  #: share of them where "no lesion" scores above "a lesion" given v
    no_lesion_rate_se: float = math.nan
    lesion_scans_corrupted: int = 0  #: those of them with v'
    no_lesion_rate_corrupted: float = math.nan  #: share where "no lesion" scores above "a lesion" given v'
    no_lesion_rate_corrupted_se: float = math.nan


@dataclass
class EvalReport:
    """What :func:`evaluate` measured on one model."""

    accuracy: float  #: closed-question accuracy by log-prob ranking (nan without closed records)
    closed: int  #: closed records ranked
    sensitivity: float  #: mean log p(answer | v) - log p(answer | v'), nats (nan without v')
    sensitivity_drops: float  #: share of records whose answer log-prob drops under v'
    sensitivity_se: float  #: standard error of ``sensitivity`` (nan with fewer than 2 records)
    corrupted: int  #: records with v' scored
    by_question: dict[str, tuple[int, int]] = field(default_factory=dict)  #: question -> (right, total)
    #: question kind (:data:`~.data.synthetic.QUESTION_KINDS` order, then :data:`OTHER_KIND`) -> its measures
    by_kind: dict[str, KindReport] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``by_kind`` as nested objects), nan written as None."""
        return _json_ready(asdict(self))


def _json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_json_ready(v) for v in x)
    return None if isinstance(x, float) and math.isnan(x) else x


def _ranking(record: QARecord, kind: str) -> list[tuple[str | None, str]] | None:
    """``(candidate, response)`` pairs to rank, the ground truth first: the closed record's candidates, or
    for the ``where`` question the ground truth and its known wrong answers (candidate None)."""
    closed = candidate_responses(record)
    if closed is not None or kind != "where" or record.ground_truth is None:
        return closed
    wrong = [w for w in dict.fromkeys(record.wrong_answers) if w != record.ground_truth]
    if not wrong:
        return None
    return [(None, record.ground_truth)] + [(None, w) for w in wrong]


@dataclass
class _Scored:
    """One record's part of the evaluation: indices of its requests on v and on v' (ground truth first)."""

    record: QARecord
    kind: str
    ranking: list[tuple[str | None, str]] | None
    clean: list[int]
    corrupted: list[int] | None


def _margin(s: Sequence[float]) -> float:
    return s[0] - max(s[1:])


def _kind_report(parts: Sequence[_Scored], scores: Sequence[float]) -> KindReport:
    acc_v: list[bool] = []
    acc_c: list[bool] = []
    m_v: list[float] = []
    m_c: list[float] = []
    shrink: list[float] = []
    drops: list[float] = []
    no_v: list[bool] = []
    no_c: list[bool] = []
    chance: list[float] = []
    for p in parts:
        sv = [scores[i] for i in p.clean]
        sc = None if p.corrupted is None else [scores[i] for i in p.corrupted]
        if sc is not None:
            drops.append(sv[0] - sc[0])
        if p.ranking is None:
            continue
        chance.append(1 / len(sv))
        acc_v.append(all(sv[0] > x for x in sv[1:]))
        m_v.append(_margin(sv))
        if sc is not None:
            acc_c.append(all(sc[0] > x for x in sc[1:]))
            m_c.append(_margin(sc))
            shrink.append(abs(m_v[-1]) - abs(m_c[-1]))
        names = [c for c, _ in p.ranking]
        if p.kind == "presence" and names[0] == PRESENCE_CANDIDATES[0] and PRESENCE_CANDIDATES[1] in names:
            j = names.index(PRESENCE_CANDIDATES[1])
            no_v.append(sv[j] > sv[0])
            if sc is not None:
                no_c.append(sc[j] > sc[0])
    accuracy, accuracy_se = _share(acc_v)
    accuracy_c, accuracy_c_se = _share(acc_c)
    margin, margin_se = mean_and_se(m_v)
    margin_c, margin_c_se = mean_and_se(m_c)
    margin_shrink, margin_shrink_se = mean_and_se(shrink)
    drop, drop_se = mean_and_se(drops)
    no_lesion, no_lesion_se = _share(no_v)
    no_lesion_c, no_lesion_c_se = _share(no_c)
    return KindReport(
        ranked=len(acc_v), chance=mean_and_se(chance)[0], accuracy=accuracy, accuracy_se=accuracy_se,
        ranked_corrupted=len(acc_c), accuracy_corrupted=accuracy_c, accuracy_corrupted_se=accuracy_c_se,
        margin=margin, margin_se=margin_se, margin_corrupted=margin_c, margin_corrupted_se=margin_c_se,
        margin_shrink=margin_shrink, margin_shrink_se=margin_shrink_se,
        corrupted=len(drops), drop=drop, drop_se=drop_se,
        lesion_scans=len(no_v), no_lesion_rate=no_lesion, no_lesion_rate_se=no_lesion_se,
        lesion_scans_corrupted=len(no_c), no_lesion_rate_corrupted=no_lesion_c,
        no_lesion_rate_corrupted_se=no_lesion_c_se,
    )


def evaluate(records: Sequence[QARecord], scorer: Scorer) -> EvalReport:
    """Closed-question accuracy, visual sensitivity and the per-kind measures of one model on ``records``.

    Every distinct request (image, question, response) is scored once, in one call of ``scorer``; the
    clean-image scores of a ranking serve its accuracy, its margin and the ground truth's drop.

    Args:
        records: held-out question records; closed ones (``candidates``) are ranked, those with a
            ``ground_truth`` and a ``corrupted_image`` enter the sensitivity; the per-kind measures
            (:class:`KindReport`) group them by :func:`~.data.synthetic.question_kind`.
        scorer: :class:`ModelScorer` or any :data:`Scorer`.

    Raises:
        TypeError: ``records`` is not a sequence of :class:`QARecord`, or ``scorer`` is not callable.
        ValueError: the scorer returned another number of scores than requests, or a non-finite score.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"evaluate: `records` must be a sequence of QARecord; got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, QARecord):
            raise TypeError(f"evaluate: `records[{i}]` must be a QARecord; got {type(rec).__name__}")
    if not callable(scorer):
        raise TypeError(f"evaluate: `scorer` must be callable (requests -> scores); got {type(scorer).__name__}")
    index: dict[ScoreRequest, int] = {}

    def ask(image: str, question: str, responses: Sequence[str]) -> list[int]:
        return [index.setdefault(ScoreRequest(image, question, r), len(index)) for r in responses]

    parts: list[_Scored] = []
    for rec in records:
        kind = question_kind(rec) or OTHER_KIND
        ranking = _ranking(rec, kind)
        has_corrupted = rec.ground_truth is not None and rec.corrupted_image is not None
        if ranking is None and not has_corrupted:
            continue
        responses = [r for _, r in ranking] if ranking is not None else [rec.ground_truth]
        clean = ask(rec.image, rec.question, responses)
        corrupted = ask(rec.corrupted_image, rec.question, responses) if has_corrupted else None
        parts.append(_Scored(rec, kind, ranking, clean, corrupted))
    requests = list(index)
    scores = list(scorer(requests)) if requests else []
    if len(scores) != len(requests):
        raise ValueError(f"evaluate: the scorer returned {len(scores)} scores for {len(requests)} requests")
    for req, s in zip(requests, scores):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"evaluate: the scorer must return finite real log-probs; got {s!r} for {req}")

    by_question: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    right = closed = 0
    drops: list[float] = []
    for p in parts:
        s = [scores[i] for i in p.clean]
        if p.ranking is not None and p.ranking[0][0] is not None:  # a closed ranking
            ok = all(s[0] > x for x in s[1:])
            right += ok
            closed += 1
            by_question[p.record.question][0] += ok
            by_question[p.record.question][1] += 1
        if p.corrupted is not None:
            drops.append(s[0] - scores[p.corrupted[0]])
    grouped: dict[str, list[_Scored]] = defaultdict(list)
    for p in parts:
        grouped[p.kind].append(p)
    order = [k for k in (*QUESTION_KINDS, OTHER_KIND) if k in grouped]
    sensitivity, sensitivity_se = mean_and_se(drops)
    return EvalReport(
        accuracy=right / closed if closed else math.nan,
        closed=closed,
        sensitivity=sensitivity,
        sensitivity_drops=sum(d > 0 for d in drops) / len(drops) if drops else math.nan,
        sensitivity_se=sensitivity_se,
        corrupted=len(drops),
        by_question={q: (r, n) for q, (r, n) in sorted(by_question.items())},
        by_kind={k: _kind_report(grouped[k], scores) for k in order},
    )


def _fmt(x: float, pct: bool = False) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:+.3f}"


def _check_reports(where: str, reports: Any) -> None:
    if not isinstance(reports, dict) or not reports:
        raise TypeError(f"{where}: `reports` must be a non-empty dict of name -> EvalReport; got {reports!r:.80}")
    for name, r in reports.items():
        if not isinstance(r, EvalReport):
            raise TypeError(f"{where}: `reports[{name!r}]` must be an EvalReport; got {type(r).__name__}")


def comparison_table(reports: dict[str, EvalReport]) -> str:
    """A markdown table of several models' reports, side by side (columns in the dict's order)."""
    _check_reports("comparison_table", reports)
    names = list(reports)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    first = reports[names[0]]
    lines.append(
        f"| closed-question accuracy ({first.closed} records) | "
        + " | ".join(_fmt(r.accuracy, pct=True) for r in reports.values()) + " |"
    )
    for q in first.by_question:
        cells = []
        for r in reports.values():
            right, n = r.by_question.get(q, (0, 0))
            cells.append(f"{right}/{n}")
        lines.append(f"| &nbsp;&nbsp;{q} | " + " | ".join(cells) + " |")
    lines.append(
        f"| visual sensitivity, nats ({first.corrupted} records) | "
        + " | ".join(_fmt(r.sensitivity) for r in reports.values()) + " |"
    )
    lines.append(
        "| share of answers less likely under v' | "
        + " | ".join(_fmt(r.sensitivity_drops, pct=True) for r in reports.values()) + " |"
    )
    return "\n".join(lines)


# kind_table's rows: label, value field, its standard error, the count it is over, percent or nats
_KIND_ROWS = (
    ("accuracy on v", "accuracy", "accuracy_se", "ranked", True),
    ("accuracy on v'", "accuracy_corrupted", "accuracy_corrupted_se", "ranked_corrupted", True),
    ("margin on v, nats", "margin", "margin_se", "ranked", False),
    ("margin on v', nats", "margin_corrupted", "margin_corrupted_se", "ranked_corrupted", False),
    ("less sure on v': mean abs(m_v) - abs(m_v'), nats", "margin_shrink", "margin_shrink_se", "ranked_corrupted", False),
    ("log-prob drop v -> v', nats", "drop", "drop_se", "corrupted", False),
    ('"no lesion" on scans with one, v', "no_lesion_rate", "no_lesion_rate_se", "lesion_scans", True),
    ('"no lesion" on scans with one, v\'', "no_lesion_rate_corrupted", "no_lesion_rate_corrupted_se",
     "lesion_scans_corrupted", True),
)


def _cell(value: float, se: float, pct: bool) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isnan(se):
        return _fmt(value, pct)
    return f"{_fmt(value, pct)} ± {100 * se:.1f}" if pct else f"{_fmt(value)} ± {se:.3f}"


def kind_table(reports: dict[str, EvalReport]) -> str:
    """A markdown table of several models' per-kind measures (:attr:`EvalReport.by_kind`), side by side.

    Per question kind: accuracy on v and v' (with the chance level), the margins on v and v', how much less
    sure the model is on v', the ground truth's log-prob drop and, for the presence question, the "no lesion"
    rate on scans with a lesion; each ``value ± standard error`` (percentage points for shares). A row shows
    only where some model has records for it; the record count is the first such model's, and a cell whose
    model counted another number of records says its own in brackets.

    Raises:
        TypeError: ``reports`` is not a non-empty dict of :class:`EvalReport`.
    """
    _check_reports("kind_table", reports)
    names = list(reports)
    lines = ["| kind / measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    seen = dict.fromkeys(k for r in reports.values() for k in r.by_kind)
    known = (*QUESTION_KINDS, OTHER_KIND)
    kinds = [k for k in known if k in seen] + [k for k in seen if k not in known]
    for kind in kinds:
        lines.append(f"| **{kind}** |" + " |" * len(names))
        have = [r.by_kind.get(kind) for r in reports.values()]
        for label, key, se_key, count_key, pct in _KIND_ROWS:
            counts = [getattr(k, count_key) if k is not None else 0 for k in have]
            if not any(counts):
                continue
            n = next(c for c in counts if c)
            text = f"{label} ({n} records"
            if key == "accuracy":
                chance = next(k.chance for k, c in zip(have, counts) if c)
                text += f", chance {100 * chance:.1f}%"
            cells = []
            for k, c in zip(have, counts):
                cell = "n/a" if k is None else _cell(getattr(k, key), getattr(k, se_key), pct)
                cells.append(cell if c == n else f"{cell} ({c})")
            lines.append(f"| &nbsp;&nbsp;{text}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generate_and_score(
    records: Sequence[QARecord],
    model: Any,
    processor: Any,
    *,
    prompt_template: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    judge: Judge | None = None,
) -> tuple[AnswerReport, list[str]]:
    """Greedy answers of ``model`` to ``records`` (batched, with a progress bar), scored by
    :func:`~.metrics.score_answers`: exact match, recall, closed accuracy of the generated answers, the judge's
    accuracy on open ones when ``judge`` is given, BLEU-1..4, ROUGE-L and METEOR on reports.

    Returns:
        ``(report, answers)``: the scores and the answers (one string per record, same order).
    """
    from .data.build_pairs import GreedyAnswerer

    answers = GreedyAnswerer(model, processor, prompt_template=prompt_template, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)(records)
    return score_answers(records, answers, judge=judge), answers


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluates one or more local models on a held-out JSONL file and prints the comparison."""
    ap = argparse.ArgumentParser(prog="python -m firempo_kernels.integrations.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="held-out question records (JSONL)")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a local Hugging Face model folder, named (repeat for side by side)")
    ap.add_argument("--prompt-template", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the reports as JSON here")
    ap.add_argument("--generate", action="store_true",
                    help="also answer every record greedily and score the answers (exact match, recall, closed "
                    "accuracy; BLEU-1..4, ROUGE-L and METEOR on reports)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="--generate: answer length limit")
    ap.add_argument("--judge", default=None, metavar="openai:MODEL",
                    help="--generate: an LLM on an OpenAI-compatible server judges the open answers")
    ap.add_argument("--base-url", default=DEFAULT_BASE_URL, help="--judge: the server's API root (…/v1)")
    ap.add_argument("--api-key-env", default=DEFAULT_KEY_ENV, help="--judge: the variable holding the key")
    ap.add_argument("--llm-cache", default=None, help="--judge: reply cache folder")
    ap.add_argument("--max-requests", type=int, default=None, help="--judge: most requests this run sends")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    return run_command("evaluate", lambda: _evaluate_command(args), debug=args.debug)


def _evaluate_command(args: argparse.Namespace) -> int:
    from .data.build_pairs import load_model

    if args.judge and not args.generate:
        raise ValueError("--judge scores generated answers: add --generate")
    judge = None
    if args.judge:
        model_name = parse_llm_spec(args.judge)
        if model_name is None:
            raise ValueError(f"--judge must be openai:MODEL; got {args.judge!r}")
        judge = AnswerJudge(ChatClient(model_name, base_url=args.base_url, api_key_env=args.api_key_env,
                                       cache_dir=args.llm_cache, max_requests=args.max_requests))
    if args.out:
        check_writable_file(args.out, "--out")
    records = load_qa_records(args.data)
    reports: dict[str, EvalReport] = {}
    generated: dict[str, tuple[AnswerReport, list[str]]] = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            name, path = Path(spec).name, spec
        model, processor = load_model(path)
        reports[name] = evaluate(records, ModelScorer(model, processor, prompt_template=args.prompt_template,
                                                      batch_size=args.batch_size))
        if args.generate:
            generated[name] = generate_and_score(
                records, model, processor, prompt_template=args.prompt_template, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, judge=judge)
    print(comparison_table(reports))
    print()
    print(kind_table(reports))
    if generated:
        print()
        print(answer_table({k: rep for k, (rep, _) in generated.items()}))
    if args.out:
        out = {k: r.to_json() for k, r in reports.items()}
        for k, (rep, answers) in generated.items():
            out[k]["generated"] = {**rep.to_json(),
                                   "answers": [{"id": r.id, "answer": a} for r, a in zip(records, answers)]}
        write_whole(args.out, json.dumps(out, indent=2, ensure_ascii=False))
        print(f"evaluate: wrote the reports to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
