"""The JSONL record formats and their validating loaders.

Two kinds of record, one JSON object per line, paths relative to the JSONL file's folder (or absolute):

Question records (the input of pair building and of the evaluation)::

    {"id": "synth-00017",                      # unique, stable: seeds the corruption noise
     "image": "images/synth-00017.png",
     "question": "Is the lesion in the left or the right lung?",
     "ground_truth": "The lesion is in the left lung.",   # optional for pair building with a custom editor
     "answer_type": "closed",                  # "closed" (candidates given) or "open"; optional
     "candidates": ["left", "right"],          # closed questions: the possible answers (phrases)
     "wrong_answers": ["The lesion is in the right lung."],  # optional: known wrong answers to edit
     "lesion_mask": "masks/synth-00017.png",   # optional: non-zero pixels = lesion
     "lesion_bbox": [12, 4, 20, 12],           # optional: [x_min, y_min, x_max, y_max] pixels, max exclusive
     "corrupted_image": "corrupted/synth-00017.png"}      # optional, written by firempo-corrupt

Preference records (the input of training) have ``id``, ``image``, ``question``, ``chosen`` and ``rejected``
(with ``<mask>...</mask>`` around the edited phrases, as in the authors' corpora) and optionally any of the
fields above. Unknown keys are kept in ``extra`` and written back unchanged.

The loaders check every record before returning any: unparsable lines, missing or empty fields, duplicate
ids, image/mask files that are missing or unreadable, masks whose size differs from the image, boxes outside
the image, and, for preference records, unbalanced, nested or empty tags and records with no tag in either
response. All problems are reported together; ``on_error="skip"`` drops the bad records (with a warning that
lists them) and ``"raise"`` raises :class:`RecordValidationError`. Nothing is left to fail in mid-epoch.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from .tags import TagError, count_tags, parse_tags

AnswerType = Literal["closed", "open"]
OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class QARecord:
    """A question about an image, with what is known about the answer and the lesion. Paths are absolute."""

    id: str
    image: str
    question: str
    ground_truth: str | None = None
    answer_type: AnswerType | None = None
    candidates: tuple[str, ...] = ()
    wrong_answers: tuple[str, ...] = ()
    lesion_mask: str | None = None
    lesion_bbox: tuple[float, float, float, float] | None = None
    corrupted_image: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PreferenceRecord(QARecord):
    """A :class:`QARecord` with a tagged chosen and rejected response."""

    chosen: str = ""
    rejected: str = ""


@dataclass(frozen=True)
class RecordProblem:
    """One thing wrong with one record: ``line`` is 1-based in the JSONL file (0 for in-memory records)."""

    line: int
    id: str | None
    message: str

    def __str__(self) -> str:
        who = f"record {self.id!r}" if self.id is not None else "record"
        return f"line {self.line}: {who}: {self.message}" if self.line else f"{who}: {self.message}"


class RecordValidationError(ValueError):
    """Raised with every problem of a record file at once; ``problems`` lists them."""

    def __init__(self, source: str, problems: Sequence[RecordProblem]):
        self.problems = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        bad = len({(p.line, p.id) for p in self.problems})
        super().__init__(f"{source}: {bad} bad record(s), {len(self.problems)} problem(s):\n  {shown}{more}")


_QA_KEYS = {f.name for f in fields(QARecord)} - {"extra"}
_PREF_KEYS = _QA_KEYS | {"chosen", "rejected"}


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _image_size(path: str) -> tuple[int, int]:
    """The image's size, after decoding it whole: a truncated file has a valid header and fails only when its
    pixels are read, which would otherwise happen mid-training."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.size


def _check_record(
    raw: Any, base: Path, preference: bool, check_files: bool
) -> tuple[QARecord | None, list[str]]:
    """Builds a record from one parsed JSON value; returns it (or None) and the list of problems."""
    if not isinstance(raw, dict):
        return None, [f"must be a JSON object; got {type(raw).__name__}"]
    errs: list[str] = []

    def text(key: str, required: bool) -> str | None:
        v = raw.get(key)
        if v is None:
            if required:
                errs.append(f"missing `{key}`")
            return None
        if not isinstance(v, str):
            errs.append(f"`{key}` must be a string; got {type(v).__name__}")
            return None
        if not v.strip():
            errs.append(f"`{key}` is empty")
            return None
        return v

    def strings(key: str) -> tuple[str, ...]:
        v = raw.get(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            errs.append(f"`{key}` must be a list of non-empty strings; got {v!r}")
            return ()
        return tuple(v)

    rid = raw.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid.strip():
        errs.append(f"`id` must be a non-empty string; got {raw.get('id')!r}")
        rid = None
    image = text("image", True)
    question = text("question", True)
    ground_truth = text("ground_truth", False)
    answer_type = raw.get("answer_type")
    if answer_type is not None and answer_type not in ("closed", "open"):
        errs.append(f"`answer_type` must be 'closed' or 'open'; got {answer_type!r}")
        answer_type = None
    candidates = strings("candidates")
    if answer_type == "closed" and len(candidates) < 2:
        errs.append(f"a closed question needs at least 2 `candidates`; got {list(candidates)}")
    wrong_answers = strings("wrong_answers")
    mask = text("lesion_mask", False)
    corrupted = text("corrupted_image", False)
    bbox = raw.get("lesion_bbox")
    if bbox is not None:
        ok = (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in bbox)
        )
        if not ok or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            errs.append(f"`lesion_bbox` must be [x_min, y_min, x_max, y_max] with max > min; got {bbox!r}")
            bbox = None
        else:
            bbox = tuple(float(x) for x in bbox)

    paths = {k: _resolve(base, v) for k, v in (("image", image), ("lesion_mask", mask), ("corrupted_image", corrupted)) if v}
    if check_files:
        sizes = {}
        for key, p in paths.items():
            if not os.path.isfile(p):
                errs.append(f"`{key}` file not found: {p}")
                continue
            try:
                sizes[key] = _image_size(p)
            except Exception as e:  # PIL raises several types for unreadable files
                errs.append(f"`{key}` is not a readable image: {p} ({type(e).__name__}: {e})")
        size = sizes.get("image")
        for key in ("lesion_mask", "corrupted_image"):
            if size and key in sizes and sizes[key] != size:
                errs.append(f"`{key}` is {sizes[key][0]}x{sizes[key][1]} but the image is {size[0]}x{size[1]}")
        if size and bbox is not None and (bbox[0] < 0 or bbox[1] < 0 or bbox[2] > size[0] or bbox[3] > size[1]):
            errs.append(f"`lesion_bbox` {list(bbox)} lies outside the {size[0]}x{size[1]} image")

    extra = {k: v for k, v in raw.items() if k not in (_PREF_KEYS if preference else _QA_KEYS)}
    common = dict(
        id=rid, image=paths.get("image"), question=question, ground_truth=ground_truth, answer_type=answer_type,
        candidates=candidates, wrong_answers=wrong_answers, lesion_mask=paths.get("lesion_mask"),
        lesion_bbox=bbox, corrupted_image=paths.get("corrupted_image"), extra=extra,
    )
    if not preference:
        return (None if errs else QARecord(**common)), errs
    chosen, rejected = text("chosen", True), text("rejected", True)
    tags = 0
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            continue
        try:
            parsed = parse_tags(value, where=f"`{key}`")
        except TagError as e:
            errs.append(str(e))
            continue
        if not parsed.text.strip():
            errs.append(f"`{key}` is empty once its tags are removed")
        tags += count_tags(value)
    if chosen is not None and rejected is not None and tags == 0 and not errs:
        errs.append("no <mask>...</mask> tag in either response: nothing to reward")
    if errs:
        return None, errs
    return PreferenceRecord(**common, chosen=chosen, rejected=rejected), errs


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, parsed value, None)`` for every non-blank line of a JSONL file, or ``(line number,
    None, problem)`` for a line that is not UTF-8 text or not JSON, so a reader can report every bad line
    at once. An editor's byte-order mark before the first line is not part of it."""
    with open(path, "rb") as f:
        for lineno, raw_line in enumerate(f, 1):
            try:
                line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, (f"not UTF-8 text (byte {raw_line[e.start]:#04x} at column {e.start + 1}); "
                                     "save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg} at column {e.colno})"


def _load(
    path: str | os.PathLike, preference: bool, on_error: OnError, check_files: bool
) -> list[QARecord]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"`on_error` must be 'raise' or 'skip'; got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"record file not found: {path}")
    base = path.resolve().parent
    problems: list[RecordProblem] = []
    records: list[QARecord] = []
    seen: dict[str, int] = {}
    for lineno, raw, problem in read_jsonl(path):
        if problem is not None:
            problems.append(RecordProblem(lineno, None, problem))
            continue
        rec, errs = _check_record(raw, base, preference, check_files)
        rid = raw.get("id") if isinstance(raw, dict) else None
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        if rid is not None:
            if rid in seen:
                errs = errs + [f"duplicate id (first on line {seen[rid]})"]
                rec = None
            else:
                seen[rid] = lineno
        problems += [RecordProblem(lineno, rid, m) for m in errs]
        if rec is not None:
            records.append(rec)
    if problems:
        err = RecordValidationError(str(path), problems)
        if on_error == "raise":
            raise err
        if not records:
            raise err  # skipping every record would "succeed" with nothing to work on
        warnings.warn(f"skipping: {err}", stacklevel=3)
    if not records:
        raise ValueError(f"{path}: the file holds no record (it is empty or has only blank lines)")
    return records


def load_qa_records(
    path: str | os.PathLike, *, on_error: OnError = "raise", check_files: bool = True
) -> list[QARecord]:
    """Loads and validates a JSONL file of question records (see the module docstring for the format).

    Args:
        path: the JSONL file; relative paths inside it are taken from its folder.
        on_error: ``"raise"`` raises :class:`RecordValidationError` listing every problem; ``"skip"`` warns
            with the same list and returns the good records.
        check_files: open each image/mask header (existence, readability, matching sizes).
    """
    return _load(path, False, on_error, check_files)


def load_preference_records(
    path: str | os.PathLike, *, on_error: OnError = "raise", check_files: bool = True
) -> list[PreferenceRecord]:
    """Loads and validates a JSONL file of preference records (tags included); see :func:`load_qa_records`."""
    return _load(path, True, on_error, check_files)  # type: ignore[return-value]


def qa_records_from_json(
    objects: Sequence[Any],
    base: str | os.PathLike,
    *,
    source: str,
    check_files: bool = True,
    problems: Sequence[RecordProblem] = (),
) -> list[QARecord]:
    """Question records from JSON objects built in memory (an importer's output), with the file loader's checks.

    Args:
        objects: one dict per record, in the JSONL format of the module docstring.
        base: the folder relative paths are taken from.
        source: what the objects come from, named in the error.
        check_files: decode each image and mask (existence, readability, matching sizes, boxes inside).
        problems: problems the caller found already; they are reported with these checks' ones, in one error.

    Raises:
        RecordValidationError: listing every problem (the given ones first), when there is any.
    """
    found = list(problems)
    records: list[QARecord] = []
    seen: set[str] = set()
    base = Path(base)
    for raw in objects:
        rec, errs = _check_record(raw, base, False, check_files)
        rid = raw.get("id") if isinstance(raw, dict) else None
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        if rid is not None and rid in seen:
            errs, rec = errs + ["duplicate id"], None
        seen.add(rid)
        found += [RecordProblem(0, rid, m) for m in errs]
        if rec is not None:
            records.append(rec)
    if found:
        raise RecordValidationError(source, found)
    return records


def record_to_json(record: QARecord, base: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON object of ``record``; paths are written relative to ``base`` when given (and below it)."""

    def rel(p: str | None) -> str | None:
        if p is None or base is None:
            return p
        r = os.path.relpath(p, base)
        return p if r.startswith("..") else r

    out: dict[str, Any] = {"id": record.id, "image": rel(record.image), "question": record.question}
    if isinstance(record, PreferenceRecord):
        out["chosen"], out["rejected"] = record.chosen, record.rejected
    optional = {
        "ground_truth": record.ground_truth,
        "answer_type": record.answer_type,
        "candidates": list(record.candidates) or None,
        "wrong_answers": list(record.wrong_answers) or None,
        "lesion_mask": rel(record.lesion_mask),
        "lesion_bbox": list(record.lesion_bbox) if record.lesion_bbox is not None else None,
        "corrupted_image": rel(record.corrupted_image),
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    out.update(record.extra)
    return out


def write_records(path: str | os.PathLike, records: Iterable[QARecord]) -> int:
    """Writes ``records`` as JSONL with paths relative to the file's folder; returns how many were written."""
    from ..cli import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    n = 0
    with atomic_write(path) as f:  # a reader, or a crash, never sees a half-written file
        for rec in records:
            f.write(json.dumps(record_to_json(rec, base), ensure_ascii=False) + "\n")
            n += 1
    return n


def as_preference(record: QARecord, chosen: str, rejected: str, **changes: Any) -> PreferenceRecord:
    """A :class:`PreferenceRecord` with the fields of ``record`` plus the given responses."""
    base = {f.name: getattr(record, f.name) for f in fields(QARecord)}
    base.update(changes)
    return PreferenceRecord(**base, chosen=chosen, rejected=rejected)


__all__ = [
    "AnswerType",
    "OnError",
    "PreferenceRecord",
    "QARecord",
    "RecordProblem",
    "RecordValidationError",
    "as_preference",
    "load_preference_records",
    "load_qa_records",
    "qa_records_from_json",
    "record_to_json",
    "write_records",
]
