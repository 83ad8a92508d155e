"""Base models for the demo and the ablation: supervised steps on question records, from hidden states.

A preference method needs a base that answers in the right format and is right only part of the time, so
that its on-policy answers give pairs of both kinds (a wrong answer and its correction, a right answer and its
counterfactual). Two stages build one from a random tiny model:

* :func:`teach` with :func:`blind_answer`: the answer *format* with a random key word, so the model speaks the
  sentences without having a reason to look at the scan;
* :func:`finetune_to_accuracy`: supervised steps on the true answers of a split of their own, stopping at the
  first check where closed-question accuracy on a *validation* split reaches the target: a base that reads the
  scans in part.

The loss is the mean token cross-entropy of the responses (EOS included), computed from hidden states with the
fused log-prob op, like everything else in this library.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["blind_answer", "true_answer", "teach", "finetune_to_accuracy", "FinetuneResult", "closed_accuracy"]


def blind_answer(record, rng: random.Random) -> str:
    """The record's ground-truth sentence with its key phrase replaced by a random candidate (or, for open
    questions, a random one of the right and the known wrong answers): the format without the finding."""
    from .data.editors import find_candidates, replace_spans

    if record.candidates:
        said = find_candidates(record.candidates, record.ground_truth)
        if len(said) == 1:
            (_, spans), = said.items()
            return replace_spans(record.ground_truth, spans, rng.choice(record.candidates))
    return rng.choice([record.ground_truth, *record.wrong_answers])


def true_answer(record, rng: random.Random) -> str:
    """The record's ground truth (``rng`` unused: the signature of :func:`blind_answer`)."""
    return record.ground_truth


def _check_positive(fn: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{fn}: `{name}` must be a positive number; got {value!r}")


def teach(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    *,
    answer: Callable[[Any, random.Random], str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: Any = None,
    show_progress: bool = True,
) -> list[float]:
    """``steps`` AdamW steps of response cross-entropy on ``batch_size`` records drawn at random; returns the
    loss of every step.

    Args:
        model: a model :func:`~.models.get_adapter` supports; left in eval mode afterwards.
        processor: its processor.
        records: question records (:class:`~.data.records.QARecord`) with a ground truth.
        answer: ``answer(record, rng) -> str``, the response taught for a record (:func:`blind_answer`,
            :func:`true_answer`).
        steps, batch_size, lr: the optimisation; ``seed`` draws the batches (and the blind key words).
        optimizer: an optimizer to continue with (its state kept between calls), or None for a new AdamW.
    """
    import torch

    from .data._progress import progress
    from .data.dataset import PromptEncoder, load_image
    from .evaluate import response_token_logprobs
    from .models import get_adapter

    _check_positive("teach", steps=steps, batch_size=batch_size, lr=lr)
    if not records:
        raise ValueError("teach: `records` is empty")
    rng = random.Random(seed)
    prompts = PromptEncoder(processor)
    tok = prompts.tokenizer
    encoded = {rec.id: prompts(rec.question, load_image(rec.image)) for rec in records}  # images never change
    adapter = get_adapter(model)
    opt = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    steps_iter = progress(range(steps), total=steps, desc="supervised steps", unit="step") if show_progress else range(steps)
    for _ in steps_iter:
        batch = rng.sample(list(records), min(batch_size, len(records)))
        rows = []
        for rec in batch:
            prompt, images = encoded[rec.id]
            response = tok(answer(rec, rng), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((prompt, response, images))
        logp = response_token_logprobs(model, adapter, rows, tok.pad_token_id)
        loss = -logp.sum() / sum(len(r) for _, r, _ in rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@dataclass
class FinetuneResult:
    """What :func:`finetune_to_accuracy` did: the steps taken and the validation measure at each check."""

    steps: int
    checks: list[tuple[int, float]]  #: (steps so far, the validation measure)
    reached: bool  #: whether the target was reached within ``max_steps``

    @property
    def accuracy(self) -> float:
        return self.checks[-1][1]


def closed_accuracy(report) -> float:
    """Closed-question accuracy of an :class:`~.evaluate.EvalReport`."""
    return report.accuracy


def finetune_to_accuracy(
    model: Any,
    processor: Any,
    train: Sequence[Any],
    validation: Sequence[Any],
    *,
    target: float,
    max_steps: int,
    check_every: int,
    batch_size: int,
    lr: float,
    seed: int,
    measure: Callable[[Any], float] = closed_accuracy,
    on_check: Callable[[int, Any], None] | None = None,
) -> FinetuneResult:
    """Supervised steps on the true answers of ``train`` until ``measure`` of the evaluation on
    ``validation`` reaches ``target`` (checked before the first step and every ``check_every`` steps), or
    ``max_steps``.

    The stopping point is chosen on the validation split only: the held-out split stays unseen.

    Args:
        measure: ``measure(EvalReport) -> float`` in [0, 1]; default the closed-question accuracy.
        on_check: called with ``(steps so far, EvalReport)`` after every check (progress lines).
    """
    import torch

    from .evaluate import ModelScorer, evaluate

    if not 0.0 < target < 1.0:
        raise ValueError(f"finetune_to_accuracy: `target` must lie in (0, 1); got {target!r}")
    _check_positive("finetune_to_accuracy", max_steps=max_steps, check_every=check_every)
    scorer = ModelScorer(model, processor)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    checks: list[tuple[int, float]] = []
    done = 0
    while True:
        report = evaluate(validation, scorer)
        checks.append((done, measure(report)))
        if on_check is not None:
            on_check(done, report)
        if checks[-1][1] >= target or done >= max_steps:
            break
        n = min(check_every, max_steps - done)
        teach(model, processor, train, answer=true_answer, steps=n, batch_size=batch_size, lr=lr,
              seed=seed + done, optimizer=opt, show_progress=False)
        done += n
    return FinetuneResult(steps=done, checks=checks, reached=checks[-1][1] >= target)
