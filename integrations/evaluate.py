"""Evaluation of a (vision-)language model on held-out question records, base and trained side by side.

Two measures, both from response log-probabilities (the sum over the response's tokens, EOS included,
given the image and the question; computed from hidden states with the fused op, no logits):

* **closed-question accuracy** by log-prob ranking: for a closed record, each candidate is put in place of
  the right one in the ground-truth answer (``"The lesion is in the left lung"`` -> ``... right lung``); the
  record counts as right when the ground truth scores strictly above every other candidate (a tie is wrong);
* **visual sensitivity**: how much the ground-truth answer's log-prob drops when the lesion is corrupted,
  ``log p(answer | v, q) - log p(answer | v', q)``, averaged over records with a corrupted image (in nats;
  larger means the answer depends more on the lesion), with the share of records where it drops at all.

Command line::

    python -m firempo_kernels.integrations.evaluate --data heldout.jsonl --model base=runs/x/base \\
        --model trained=runs/x/final [--out metrics.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data._progress import progress
from .data.dataset import PromptEncoder, load_image
from .data.editors import find_candidates, replace_spans
from .data.records import QARecord, load_qa_records
from .data.tags import encode_response


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``response`` (plain text, no tags) as the answer to ``question`` about the image at ``image``."""

    image: str
    question: str
    response: str


Scorer = Callable[[Sequence[ScoreRequest]], list[float]]
"""Anything returning, per request, the summed log-probability of the response tokens (EOS included)."""


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
        from firempo_kernels import fused_linear_logprobs

        scores: list[float] = []
        device = next(self.model.parameters()).device
        pad = self.prompts.tokenizer.pad_token_id or 0
        chunks = [requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        for chunk in progress(chunks, total=len(chunks), desc="scoring answers", unit="batch"):
            rows = [self._rows(r) for r in chunk]
            length = max(len(p) + len(r) for p, r, _ in rows)
            ids = torch.full((len(rows), length), pad, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            targets = torch.full_like(ids, -100)
            for i, (p, r, _) in enumerate(rows):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
                targets[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            images = {k: torch.cat([im[k] for _, _, im in rows]).to(device) for k in rows[0][2]}
            hidden = self.adapter.hidden_states(self.model, ids.to(device), mask.to(device), images)
            weight, bias = self.adapter.head(self.model)
            # hidden state t predicts token t + 1
            logp = fused_linear_logprobs(
                hidden[:, :-1].contiguous(), weight, targets[:, 1:].contiguous().to(device), bias=bias
            )
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

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def evaluate(records: Sequence[QARecord], scorer: Scorer) -> EvalReport:
    """Closed-question accuracy and visual sensitivity of one model on ``records``.

    Args:
        records: held-out question records; closed ones (``candidates``) are ranked, those with a
            ``ground_truth`` and a ``corrupted_image`` enter the sensitivity.
        scorer: :class:`ModelScorer` or any :data:`Scorer`.
    """
    requests: list[ScoreRequest] = []
    ranked: list[tuple[QARecord, int, int]] = []  # record, first request, number of candidates
    sensitive: list[int] = []  # index of the clean request; the corrupted one follows it
    for rec in records:
        cands = candidate_responses(rec)
        if cands is not None:
            ranked.append((rec, len(requests), len(cands)))
            requests += [ScoreRequest(rec.image, rec.question, resp) for _, resp in cands]
        if rec.ground_truth is not None and rec.corrupted_image is not None:
            sensitive.append(len(requests))
            requests += [
                ScoreRequest(rec.image, rec.question, rec.ground_truth),
                ScoreRequest(rec.corrupted_image, rec.question, rec.ground_truth),
            ]
    scores = list(scorer(requests)) if requests else []
    if len(scores) != len(requests):
        raise ValueError(f"evaluate: the scorer returned {len(scores)} scores for {len(requests)} requests")
    by_question: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    right = 0
    for rec, start, n in ranked:
        s = scores[start : start + n]
        ok = all(s[0] > x for x in s[1:])
        right += ok
        by_question[rec.question][0] += ok
        by_question[rec.question][1] += 1
    drops = [scores[i] - scores[i + 1] for i in sensitive]
    return EvalReport(
        accuracy=right / len(ranked) if ranked else math.nan,
        closed=len(ranked),
        sensitivity=sum(drops) / len(drops) if drops else math.nan,
        sensitivity_drops=sum(d > 0 for d in drops) / len(drops) if drops else math.nan,
        sensitivity_se=_standard_error(drops),
        corrupted=len(drops),
        by_question={q: (r, n) for q, (r, n) in sorted(by_question.items())},
    )


def _standard_error(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _fmt(x: float, pct: bool = False) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:+.3f}"


def comparison_table(reports: dict[str, EvalReport]) -> str:
    """A markdown table of several models' reports, side by side (columns in the dict's order)."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluates one or more local models on a held-out JSONL file and prints the comparison."""
    ap = argparse.ArgumentParser(prog="python -m firempo_kernels.integrations.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="held-out question records (JSONL)")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a local Hugging Face model folder, named (repeat for side by side)")
    ap.add_argument("--prompt-template", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the reports as JSON here")
    args = ap.parse_args(argv)
    from .data.build_pairs import load_model

    records = load_qa_records(args.data)
    reports: dict[str, EvalReport] = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            name, path = Path(spec).name, spec
        model, processor = load_model(path)
        reports[name] = evaluate(records, ModelScorer(model, processor, prompt_template=args.prompt_template,
                                                      batch_size=args.batch_size))
    print(comparison_table(reports))
    if args.out:
        from .cli import atomic_write

        with atomic_write(args.out) as f:
            json.dump({k: r.to_json() for k, r in reports.items()}, f, indent=2)
        print(f"evaluate: wrote the reports to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
