"""Editors: judge an answer and return its minimal edit, the first step of the paper's pair construction.

An editor is any callable ``editor(record, answer) -> Edit | None``:

* the answer is wrong -> ``Edit(correct=False, edited=<the answer minimally corrected>)``;
* the answer is right -> ``Edit(correct=True, edited=<a counterfactual: the answer minimally made wrong>)``;
* None when it cannot tell or cannot edit: the record is dropped (and counted).

Built in: :class:`RuleBasedEditor` for closed questions and records that carry the ground truth;
:class:`LLMEditor`, which asks any text generator (a local Hugging Face model via
:meth:`LLMEditor.from_pretrained`, or a function of your own) for the judgement and the edit in JSON; and
:class:`OpenAIEditor`, the paper's two calls to an OpenAI-compatible server (judge and minimally edit, then
tag the differing phrases). :func:`load_editor` turns a command-line spec (``rule``, ``hf:/path/to/model``,
``openai:MODEL``, ``package.module:name``) into an editor.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any, Callable, Protocol, Sequence

from ..llm_client import ChatClient, json_objects, parse_llm_spec
from .corrupt import record_seed
from .records import QARecord


@dataclass(frozen=True)
class Edit:
    """An editor's verdict: whether the answer is right, and the minimally edited alternative.

    ``tagged``, when the editor tags the differences itself (the paper's second LLM call): the answer and the
    edit with their differing phrases in ``<mask>`` tags. Pair building uses them when removing the tags gives
    back the answer and the edit and both carry a tag, and tags the word-level diff otherwise.
    """

    correct: bool
    edited: str
    tagged: tuple[str, str] | None = None


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


EDIT_PROMPT = """You check a model's answer to a question about a medical image against the reference answer.
Question: {question}
Reference answer: {ground_truth}
Model answer: {answer}
Find the sentence of the model answer that states its answer and decide whether that answer is correct.
If it is wrong, rewrite the sentence with the fewest word changes so that it agrees with the reference.
If it is correct, rewrite the sentence with the fewest word changes so that it becomes clinically wrong.
Reply with JSON only: {{"answer_sentence": "<the sentence, copied>", "final_answer": "<its answer in a few words>",
"is_correct": true or false, "opposite_answer": "<the rewritten sentence>"}}
"""

TAG_PROMPT = """Two sentences differ in a few words.
Sentence A: {first}
Sentence B: {second}
Copy both sentences unchanged, except that every phrase where they differ is wrapped in <mask> and </mask>,
in both sentences.
Reply with JSON only: {{"a": "<sentence A with its tags>", "b": "<sentence B with its tags>"}}
"""


class OpenAIEditor:
    """The paper's editor: two calls to an OpenAI-compatible chat model.

    1. judge and minimally edit (:data:`EDIT_PROMPT`): the reply's ``answer_sentence`` is replaced in the answer
       by its ``opposite_answer`` (the whole answer when the sentence is not found in it), ``is_correct`` is
       the verdict;
    2. tag (:data:`TAG_PROMPT`): the answer and the edit with their differing phrases in ``<mask>`` tags,
       returned as :attr:`Edit.tagged` (pair building falls back to the word-level diff when they do not
       reproduce the two sentences).

    Args:
        client: a :class:`~..llm_client.ChatClient` (or anything with ``chat(messages) -> str``).
        edit_prompt, tag_prompt: format strings with ``{question}``, ``{ground_truth}``, ``{answer}`` and
            ``{first}``, ``{second}``.

    A first reply without ``is_correct`` (bool) and ``opposite_answer`` (text) gives None (record dropped).
    """

    def __init__(self, client: Any, *, edit_prompt: str = EDIT_PROMPT, tag_prompt: str = TAG_PROMPT) -> None:
        if not callable(getattr(client, "chat", None)):
            raise TypeError(f"OpenAIEditor: `client` must have a chat(messages) method; got {type(client).__name__}")
        self.client = client
        self.edit_prompt = edit_prompt
        self.tag_prompt = tag_prompt

    def _ask(self, prompt: str) -> str:
        return self.client.chat([{"role": "user", "content": prompt}])

    def __call__(self, record: QARecord, answer: str) -> Edit | None:
        if not isinstance(answer, str):
            raise TypeError(f"OpenAIEditor: `answer` must be a str; got {type(answer).__name__}")
        reply = self._ask(self.edit_prompt.format(
            question=record.question, ground_truth=record.ground_truth or "unknown", answer=answer))
        found = [o for o in json_objects(reply)
                 if isinstance(o.get("is_correct"), bool) and isinstance(o.get("opposite_answer"), str)
                 and o["opposite_answer"].strip()]
        if not found:
            return None
        verdict = found[0]
        sentence = verdict.get("answer_sentence")
        opposite = verdict["opposite_answer"].strip()
        if isinstance(sentence, str) and sentence.strip() and sentence.strip() in answer:
            edited = answer.replace(sentence.strip(), opposite, 1)
        else:
            edited = opposite
        if _norm(edited) == _norm(answer):
            return Edit(correct=verdict["is_correct"], edited=edited)
        tags = [o for o in json_objects(self._ask(self.tag_prompt.format(first=answer, second=edited)))
                if isinstance(o.get("a"), str) and isinstance(o.get("b"), str)]
        tagged = (tags[0]["a"], tags[0]["b"]) if tags else None
        return Edit(correct=verdict["is_correct"], edited=edited, tagged=tagged)


def parse_edit_reply(reply: str) -> Edit | None:
    """Reads ``{"correct": bool, "edited": str}`` from the first JSON object in ``reply``; None if absent."""
    if not isinstance(reply, str):
        raise TypeError(f"parse_edit_reply: `reply` must be a str; got {type(reply).__name__}")
    for obj in json_objects(reply):
        if (
            isinstance(obj.get("correct"), bool)
            and isinstance(obj.get("edited"), str)
            and obj["edited"].strip()
        ):
            return Edit(correct=obj["correct"], edited=obj["edited"].strip())
    return None


def load_editor(spec: str, **client_options: Any) -> Editor:
    """An editor from a command-line spec.

    ``rule``: :class:`RuleBasedEditor`. ``hf:PATH``: :meth:`LLMEditor.from_pretrained` on a local model.
    ``openai:MODEL``: :class:`OpenAIEditor` on a :class:`~..llm_client.ChatClient` made with
    ``client_options`` (``base_url``, ``api_key_env``, ``cache_dir``, ``max_requests``...).
    ``package.module:name``: that callable; a class is instantiated with no arguments.
    """
    forms = "'rule', 'hf:PATH', 'openai:MODEL' or 'module:callable'"
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"load_editor: `spec` must be {forms}; got {spec!r}")
    if spec == "rule":
        return RuleBasedEditor()
    if spec.startswith("hf:"):
        return LLMEditor.from_pretrained(spec[3:])
    model = parse_llm_spec(spec)
    if model is not None:
        return OpenAIEditor(ChatClient(model, **client_options))
    if ":" not in spec:
        raise ValueError(f"load_editor: `spec` must be {forms}; got {spec!r}")
    module, name = spec.split(":", 1)
    obj = getattr(importlib.import_module(module), name)
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise TypeError(f"load_editor: {spec!r} is not callable; got {type(obj).__name__}")
    return obj
