"""Editors: judge an answer and return its minimal edit, the first step of the paper's pair construction.

An editor is any callable ``editor(record, answer) -> Edit | None``:

* the answer is wrong -> ``Edit(correct=False, edited=<the answer minimally corrected>)``;
* the answer is right -> ``Edit(correct=True, edited=<a counterfactual: the answer minimally made wrong>)``;
* None when it cannot tell or cannot edit: the record is dropped (and counted).

Built in: :class:`RuleBasedEditor` for closed questions and records that carry the ground truth, and
:class:`LLMEditor`, which asks any text generator (a local Hugging Face model via
:meth:`LLMEditor.from_pretrained`, or a function of your own) for the judgement and the edit in JSON.
:func:`load_editor` turns a command-line spec (``rule``, ``hf:/path/to/model``, ``package.module:name``) into
an editor.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Callable, Protocol, Sequence

from .corrupt import record_seed
from .records import QARecord


@dataclass(frozen=True)
class Edit:
    """An editor's verdict: whether the answer is right, and the minimally edited alternative."""

    correct: bool
    edited: str


class Editor(Protocol):
    """Anything called as ``editor(record, answer)`` returning an :class:`Edit` or None (drop the record)."""

    def __call__(self, record: QARecord, answer: str) -> Edit | None: ...


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _find(phrase: str, text: str) -> list[tuple[int, int]]:
    """Case-insensitive whole-word occurrences of ``phrase`` in ``text``."""
    words = re.findall(r"\w+", phrase)
    if not words:
        return []
    pattern = r"(?<!\w)" + r"\W+".join(re.escape(w) for w in words) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def _match_case(template: str, word: str) -> str:
    if template[:1].isupper() and word[:1].islower():
        return word[:1].upper() + word[1:]
    if template[:1].islower() and word[:1].isupper() and not word.isupper():
        return word[:1].lower() + word[1:]
    return word


def find_candidates(candidates: Sequence[str], text: str) -> dict[str, list[tuple[int, int]]]:
    """The candidates (phrases) that occur in ``text`` as whole words, case-insensitively, with their
    ``(start, end)`` character spans; longer candidates claim their words first, so that ``upper left`` is
    not also read as ``left``."""
    found: dict[str, list[tuple[int, int]]] = {}
    taken: list[tuple[int, int]] = []
    for cand in sorted(candidates, key=lambda c: (-len(c), c)):
        spans = [s for s in _find(cand, text) if all(s[1] <= a or s[0] >= b for a, b in taken)]
        if spans:
            found[cand] = spans
            taken += spans
    return found


def replace_spans(text: str, spans: Sequence[tuple[int, int]], new: str) -> str:
    """``text`` with each ``(start, end)`` span replaced by ``new``, keeping a capital first letter."""
    out, pos = [], 0
    for a, b in spans:
        out += [text[pos:a], _match_case(text[a:b], new)]
        pos = b
    return "".join(out) + text[pos:]


class RuleBasedEditor:
    """Judges and edits answers from the record's ``ground_truth``, ``candidates`` and ``wrong_answers``.

    Closed questions (``candidates`` given): the answer is right when the only candidate it mentions is
    the one the ground truth mentions. A wrong answer that mentions one wrong candidate gets that phrase
    replaced by the right one; a right answer gets its candidate replaced by another one, picked from the
    record id (deterministic). Open questions: the answer is right when it contains the ground truth's
    words; the counterfactual replaces them with a known wrong answer, or is the known wrong answer that
    differs least from the answer. An answer that mentions nothing usable is corrected to the ground truth
    as a whole. Records without a ground truth, or right answers with nothing to swap in, give None.
    """

    def __call__(self, record: QARecord, answer: str) -> Edit | None:
        if not isinstance(answer, str):
            raise TypeError(f"RuleBasedEditor: `answer` must be a str; got {type(answer).__name__}")
        gt = record.ground_truth
        if gt is None or not answer.strip():
            return None
        if record.candidates:
            return self._closed(record, answer, gt)
        return self._open(record, answer, gt)

    def _closed(self, record: QARecord, answer: str, gt: str) -> Edit | None:
        gt_keys = list(find_candidates(record.candidates, gt))
        if len(gt_keys) != 1:
            return self._open(record, answer, gt)
        right = gt_keys[0]
        said = find_candidates(record.candidates, answer)
        others = [c for c in record.candidates if c != right]
        if set(said) == {right}:
            wrong = others[record_seed(record.id) % len(others)]
            return Edit(correct=True, edited=replace_spans(answer, said[right], wrong))
        wrong_said = [c for c in said if c != right]
        if len(wrong_said) == 1 and right not in said:
            return Edit(correct=False, edited=replace_spans(answer, said[wrong_said[0]], right))
        return Edit(correct=False, edited=gt)

    def _open(self, record: QARecord, answer: str, gt: str) -> Edit | None:
        right_spans = _find(gt, answer)
        if right_spans or _norm(answer) == _norm(gt):
            return self._counterfactual(record, answer, gt, right_spans)
        for wrong in sorted(record.wrong_answers, key=lambda w: (-len(w), w)):
            spans = _find(wrong, answer)
            if spans and len(_norm(wrong).split()) < len(_norm(answer).split()):
                return Edit(correct=False, edited=replace_spans(answer, spans, gt))
        return Edit(correct=False, edited=gt)

    def _counterfactual(
        self, record: QARecord, answer: str, gt: str, right_spans: list[tuple[int, int]]
    ) -> Edit | None:
        wrongs = [w for w in record.wrong_answers if _norm(w) != _norm(gt)]
        if not wrongs:
            return None
        if right_spans and _norm(gt) != _norm(answer):  # ground truth is a phrase inside the answer
            wrong = sorted(wrongs)[record_seed(record.id) % len(wrongs)]
            return Edit(correct=True, edited=replace_spans(answer, right_spans, wrong))
        closest = max(wrongs, key=lambda w: (SequenceMatcher(a=answer.split(), b=w.split()).ratio(), w))
        return Edit(correct=True, edited=closest)


_LLM_PROMPT = """You check answers to medical image questions and edit them as little as possible.
Question: {question}
Reference answer: {ground_truth}
Model answer: {answer}
If the model answer is wrong, rewrite it with the fewest word changes so that it agrees with the reference.
If it is right, rewrite it with the fewest word changes so that it becomes clinically wrong.
Reply with JSON only: {{"correct": true or false, "edited": "<the rewritten answer>"}}
"""


class LLMEditor:
    """An editor backed by a text generator ``generate(prompt) -> completion`` that answers in JSON.

    Args:
        generate: any function from a prompt string to the model's reply (a local model, a server client).
        prompt: a format string with ``{question}``, ``{ground_truth}`` and ``{answer}``.

    A reply without a parsable ``{"correct": bool, "edited": str}`` object gives None (record dropped).
    """

    def __init__(self, generate: Callable[[str], str], prompt: str = _LLM_PROMPT):
        if not callable(generate):
            raise TypeError(f"LLMEditor: `generate` must be callable; got {type(generate).__name__}")
        self.generate = generate
        self.prompt = prompt

    def __call__(self, record: QARecord, answer: str) -> Edit | None:
        reply = self.generate(
            self.prompt.format(question=record.question, ground_truth=record.ground_truth or "unknown", answer=answer)
        )
        return parse_edit_reply(reply)

    @classmethod
    def from_pretrained(cls, path: str, *, max_new_tokens: int = 128, device: str = "cpu") -> "LLMEditor":
        """An editor on a local Hugging Face causal LM (greedy decoding; nothing is downloaded)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()

        def generate(prompt: str) -> str:
            if getattr(tok, "chat_template", None):
                prompt = tok.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            enc = tok(prompt, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
            return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

        return cls(generate)


def parse_edit_reply(reply: str) -> Edit | None:
    """Reads ``{"correct": bool, "edited": str}`` from the first JSON object in ``reply``; None if absent."""
    if not isinstance(reply, str):
        raise TypeError(f"parse_edit_reply: `reply` must be a str; got {type(reply).__name__}")
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", reply):
        try:
            obj, _ = decoder.raw_decode(reply, m.start())
        except json.JSONDecodeError:
            continue
        if (
            isinstance(obj, dict)
            and isinstance(obj.get("correct"), bool)
            and isinstance(obj.get("edited"), str)
            and obj["edited"].strip()
        ):
            return Edit(correct=obj["correct"], edited=obj["edited"].strip())
    return None


def load_editor(spec: str) -> Editor:
    """An editor from a command-line spec.

    ``rule``: :class:`RuleBasedEditor`. ``hf:PATH``: :meth:`LLMEditor.from_pretrained` on a local model.
    ``package.module:name``: that callable; a class is instantiated with no arguments.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"load_editor: `spec` must be 'rule', 'hf:PATH' or 'module:callable'; got {spec!r}")
    if spec == "rule":
        return RuleBasedEditor()
    if spec.startswith("hf:"):
        return LLMEditor.from_pretrained(spec[3:])
    if ":" not in spec:
        raise ValueError(f"load_editor: `spec` must be 'rule', 'hf:PATH' or 'module:callable'; got {spec!r}")
    module, name = spec.split(":", 1)
    obj = getattr(importlib.import_module(module), name)
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise TypeError(f"load_editor: {spec!r} is not callable; got {type(obj).__name__}")
    return obj
