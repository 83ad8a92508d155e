"""On-policy preference pairs, as the paper builds them: the policy answers, an editor judges and edits,
a word-level diff tags the edited phrases on both sides.

For each question record (image, question, ground truth):

1. the policy answers greedily (:class:`GreedyAnswerer`, or answers you bring in a JSONL file);
2. the editor returns whether the answer is right and a minimally edited alternative (:mod:`.editors`);
3. :func:`.diff.tag_differences` wraps exactly the differing phrases of answer and edit in ``<mask>`` tags;
4. the paper's policy: a wrong answer is the rejected response and its correction the chosen one; a right
   answer is the chosen response and its counterfactual edit the rejected one.

Records the editor cannot handle, empty answers, and edits identical to the answer are dropped and counted.
Everything is deterministic given the model, the records and the editor.

Command line::

    firempo-build-pairs --data questions.jsonl --model path/to/hf-model --out pairs.jsonl [--editor rule]
    firempo-build-pairs ... --editor openai:gpt-4o-mini [--base-url http://localhost:8000/v1] [--max-requests N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cli import check_writable_file, run_command
from ..llm_client import DEFAULT_BASE_URL, DEFAULT_KEY_ENV
from ._progress import progress
from .dataset import PromptEncoder, load_image
from .diff import tag_differences
from .editors import Edit, Editor, load_editor
from .records import PreferenceRecord, QARecord, as_preference, load_qa_records, read_jsonl, write_records
from .tags import TagError, parse_tags

Answerer = Callable[[Sequence[QARecord]], list[str]]


class GreedyAnswerer:
    """Greedy answers of a Hugging Face (vision-)language model to question records.

    Args:
        model: a model with ``generate`` (e.g. ``LlavaForConditionalGeneration``), in eval mode.
        processor: its processor (or tokenizer for text-only models).
        prompt_template: see :class:`.dataset.PromptEncoder` (default: the chat template).
        max_new_tokens: answer length limit.
        batch_size: records per ``generate`` call (left-padded).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt_template: str | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 16,
    ) -> None:
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GreedyAnswerer: `{name}` must be a positive int; got {value!r}")
        self.model = model
        self.prompts = PromptEncoder(processor, prompt_template=prompt_template)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @contextlib.contextmanager
    def _left_padding(self):
        tok = self.prompts.tokenizer
        old = tok.padding_side
        tok.padding_side = "left"  # generation continues every row from its last real token
        try:
            yield tok
        finally:
            tok.padding_side = old

    def __call__(self, records: Sequence[QARecord]) -> list[str]:
        import torch

        answers: list[str] = []
        batches = [records[i : i + self.batch_size] for i in range(0, len(records), self.batch_size)]
        device = next(self.model.parameters()).device
        with self._left_padding() as tok, torch.no_grad():
            for batch in progress(batches, total=len(batches), desc="generating answers", unit="batch"):
                texts = [self.prompts.text(r.question) for r in batch]
                if self.prompts.multimodal:
                    images = [load_image(r.image) for r in batch]
                    enc = self.prompts.processor(text=texts, images=images, return_tensors="pt", padding=True)
                else:
                    enc = tok(texts, return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
                out = self.model.generate(
                    **enc,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                answers += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
        return answers


@dataclass
class PairStats:
    """What pair building did: how many answers were right or wrong and why records were dropped."""

    right: int = 0
    wrong: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return self.right + self.wrong

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"{self.kept} pairs ({self.wrong} from wrong answers, {self.right} from right ones); dropped: {drops}"


def _editor_tags(answer: str, edit: Edit) -> tuple[str, str] | None:
    """The editor's own tagged answer and edit, when removing their tags gives back the two texts (whitespace
    aside) and each carries a tag; None otherwise (the word-level diff tags them)."""
    if edit.tagged is None:
        return None
    out = []
    for tagged, plain in zip(edit.tagged, (answer, edit.edited)):
        try:
            parsed = parse_tags(tagged)
        except TagError:
            return None
        if not parsed.spans or parsed.text.split() != plain.split():
            return None
        out.append(tagged.strip())
    return out[0], out[1]


def make_pair(record: QARecord, answer: str, editor: Editor) -> tuple[PreferenceRecord | None, str]:
    """One preference record from a record and the policy's answer; ``(None, reason)`` when dropped.

    The pair keeps the record's fields and adds ``answer`` and ``answer_correct`` to ``extra``.
    """
    if not isinstance(answer, str):
        raise TypeError(f"make_pair: `answer` must be a str; got {type(answer).__name__}")
    answer = answer.strip()
    if not answer:
        return None, "empty answer"
    edit = editor(record, answer)
    if edit is None:
        return None, "no edit from the editor"
    tagged = _editor_tags(answer, edit)
    if tagged is None:
        try:
            diff = tag_differences(answer, edit.edited)
        except ValueError:
            return None, "edit has the answer's words"
        tagged = diff.first, diff.second
    if edit.correct:
        chosen, rejected = tagged
    else:
        rejected, chosen = tagged
    extra = {**record.extra, "answer": answer, "answer_correct": edit.correct}
    return as_preference(record, chosen, rejected, extra=extra), "correct" if edit.correct else "wrong"


def make_pairs(
    records: Sequence[QARecord], answers: Sequence[str], editor: Editor
) -> tuple[list[PreferenceRecord], PairStats]:
    """Pairs for ``records`` given the policy's ``answers`` (same order); see :func:`make_pair`."""
    if len(records) != len(answers):
        raise ValueError(f"make_pairs: got {len(records)} records but {len(answers)} answers")
    stats = PairStats()
    pairs: list[PreferenceRecord] = []
    for rec, ans in zip(records, answers):
        pair, why = make_pair(rec, ans, editor)
        if pair is None:
            stats.dropped[why] += 1
            continue
        pairs.append(pair)
        if why == "correct":
            stats.right += 1
        else:
            stats.wrong += 1
    return pairs, stats


def load_model(path: str, device: str = "cpu"):
    """``(model, processor)`` from a local Hugging Face folder, nothing downloaded."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"--model: no model folder at {path} (a local Hugging Face model folder with config.json; nothing is "
            "downloaded)"
        )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    except ValueError:  # a text-only model
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


def _read_answers(path: str, records: Sequence[QARecord]) -> list[str]:
    """The answer of every record from a JSONL of ``{"id", "answer"}`` lines; every bad line is reported at
    once, by its line number in the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--answers: no answers file at {path}")
    by_id: dict[str, tuple[str, int]] = {}
    problems: list[str] = []
    for lineno, obj, problem in read_jsonl(path):
        if problem is not None:
            problems.append(f"line {lineno}: {problem}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("answer"), str) or obj.get("id") is None:
            problems.append(f'line {lineno}: must be {{"id": ..., "answer": "..."}}; got {json.dumps(obj)[:120]}')
            continue
        rid = str(obj["id"])
        if rid in by_id:
            problems.append(f"line {lineno}: id {rid!r} already answered on line {by_id[rid][1]}")
            continue
        by_id[rid] = (obj["answer"], lineno)
    missing = [r.id for r in records if r.id not in by_id]
    if missing:
        problems.append(f"no answer for {len(missing)} record(s), e.g. {missing[:5]}")
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise ValueError(f"{path}: {len(problems)} problem(s):\n  {shown}")
    return [by_id[r.id][0] for r in records]


def main(argv: Sequence[str] | None = None) -> int:
    """``firempo-build-pairs``: question records in, tagged on-policy preference records out."""
    ap = argparse.ArgumentParser(prog="firempo-build-pairs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="question records (JSONL) with ground truth")
    ap.add_argument("--out", required=True, help="where to write the preference records (JSONL)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model folder: the policy that answers greedily")
    src.add_argument("--answers", help="JSONL of {\"id\", \"answer\"}: answers generated elsewhere")
    ap.add_argument("--editor", default="rule",
                    help="'rule', 'hf:PATH' (local LLM), 'openai:MODEL' (OpenAI-compatible server) or "
                    "'package.module:callable'")
    ap.add_argument("--base-url", default=DEFAULT_BASE_URL, help="openai editor: the server's API root (…/v1)")
    ap.add_argument("--api-key-env", default=DEFAULT_KEY_ENV, help="openai editor: the variable holding the key")
    ap.add_argument("--llm-cache", default=None, help="openai editor: reply cache folder "
                    "(default $FIREMPO_LLM_CACHE or ~/.cache/firempo-kernels/llm)")
    ap.add_argument("--max-requests", type=int, default=None, help="openai editor: most requests this run sends")
    ap.add_argument("--prompt-template", default=None, help="format string with {question} and {image}")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad records: fail or skip")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    return run_command("firempo-build-pairs", lambda: _build_pairs(args), debug=args.debug)


def _build_pairs(args: argparse.Namespace) -> int:
    check_writable_file(args.out, "--out")  # before the answers are generated, not after
    records = load_qa_records(args.data, on_error=args.on_error)
    options = dict(base_url=args.base_url, api_key_env=args.api_key_env, cache_dir=args.llm_cache,
                   max_requests=args.max_requests) if args.editor.startswith("openai:") else {}
    editor = load_editor(args.editor, **options)
    if args.model:
        model, processor = load_model(args.model, args.device)
        answers = GreedyAnswerer(
            model, processor, prompt_template=args.prompt_template,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        )(records)
    else:
        answers = _read_answers(args.answers, records)
    pairs, stats = make_pairs(records, answers, editor)
    n = write_records(args.out, pairs)
    print(f"firempo-build-pairs: {stats.summary()}; wrote {n} preference records to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
