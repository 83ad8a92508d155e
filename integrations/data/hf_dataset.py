"""Preference records (:mod:`.records`) as a Hugging Face ``datasets.Dataset`` in TRL's preference format.

One row per record, with these columns (:func:`preference_features`)::

    id                str                       the record's id
    prompt            str                       the question, or ``prompt_template.format(question=...)``
    chosen            str                       as written, ``<mask>...</mask>`` tags kept
    rejected          str                       as written, ``<mask>...</mask>`` tags kept
    images            List(Image(mode="RGB"))   one image: the record's ``image``
    corrupted_images  List(Image(mode="RGB"))   one image (the record's ``corrupted_image``) or none

A record without a corrupted image has an **empty list** in ``corrupted_images`` (the column type stays a list
of images for every row, which ``datasets`` requires; a row with ``[]`` has no v', c = 0). ``images`` always
holds exactly one image, as TRL's vision preference trainers expect.

Every image file is read and fully decoded when the dataset is built, so a truncated or corrupt file fails
then, naming the record's id and JSONL line, never in mid-epoch. The file's own bytes are stored in the
dataset (no re-encoding, the dataset no longer depends on the files); rows decode to PIL images converted to
RGB (EXIF orientation applied, as ``datasets`` does). ``datasets`` and Pillow are imported when called.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .records import OnError, PreferenceRecord, RecordProblem, RecordValidationError, load_preference_records

if TYPE_CHECKING:
    import datasets

__all__ = [
    "load_preference_dataset",
    "preference_dataset_from_records",
    "preference_features",
    "preference_rows_from_records",
]

COLUMNS = ("id", "prompt", "chosen", "rejected", "images", "corrupted_images")


def preference_features() -> "datasets.Features":
    """The ``datasets.Features`` of the rows: ``id``, ``prompt``, ``chosen``, ``rejected`` strings;
    ``images`` and ``corrupted_images`` lists of ``Image(mode="RGB")`` (one image, and zero or one)."""
    import datasets

    def images() -> Any:
        image = datasets.Image(mode="RGB")
        return datasets.List(image) if hasattr(datasets, "List") else datasets.Sequence(image)

    return datasets.Features({
        "id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "images": images(),
        "corrupted_images": images(),
    })


def _check_args(fn: str, on_error: Any, prompt_template: Any) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"{fn}: `on_error` must be 'raise' or 'skip'; got {on_error!r}")
    if prompt_template is None:
        return
    if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
        raise ValueError(f"{fn}: `prompt_template` must be a str containing '{{question}}'; got {prompt_template!r}")
    try:
        prompt_template.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"{fn}: `prompt_template` must have no field but {{question}} (write other braces as '{{{{' and "
            f"'}}}}'); got {prompt_template!r} ({type(e).__name__}: {e})"
        ) from None


def _read_image(path: str) -> dict[str, Any]:
    """The file's bytes, after decoding them fully (a truncated file raises here), as ``Image()`` stores them."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    return {"bytes": data, "path": None}  # with a path to an existing file, datasets would keep the path only


def _rows(
    records: Iterable[PreferenceRecord],
    prompt_template: str | None,
    lines: Mapping[str, int],
) -> tuple[list[dict[str, Any]], list[RecordProblem]]:
    rows: list[dict[str, Any]] = []
    problems: list[RecordProblem] = []
    for rec in records:
        if not isinstance(rec, PreferenceRecord):
            raise ValueError(f"`records` must hold PreferenceRecord objects; got {type(rec).__name__}")
        line = lines.get(rec.id, 0)
        errs: list[str] = []
        images: dict[str, list[dict[str, Any]]] = {"images": [], "corrupted_images": []}
        for key, column, path in (("image", "images", rec.image), ("corrupted_image", "corrupted_images",
                                                                     rec.corrupted_image)):
            if path is None:
                continue
            try:
                images[column].append(_read_image(path))
            except Exception as e:  # PIL raises several types for truncated or unreadable files
                errs.append(f"`{key}` could not be decoded: {path} ({type(e).__name__}: {e})")
        if errs:
            problems += [RecordProblem(line, rec.id, m) for m in errs]
            continue
        prompt = rec.question if prompt_template is None else prompt_template.format(question=rec.question)
        rows.append({"id": rec.id, "prompt": prompt, "chosen": rec.chosen, "rejected": rec.rejected, **images})
    return rows, problems


def _finish(source: str, rows: list[dict[str, Any]], problems: list[RecordProblem], on_error: OnError
            ) -> list[dict[str, Any]]:
    problems = sorted(problems, key=lambda p: p.line)
    if problems:
        err = RecordValidationError(source, problems)
        if on_error == "raise":
            raise err
        warnings.warn(f"skipping: {err}", stacklevel=3)
    return rows


def preference_rows_from_records(
    records: Iterable[PreferenceRecord],
    *,
    prompt_template: str | None = None,
    on_error: OnError = "raise",
) -> list[dict[str, Any]]:
    """The rows of :func:`preference_dataset_from_records` as plain dicts, images in ``datasets``' stored form.

    Args:
        records: validated preference records (e.g. from :func:`.records.load_preference_records`).
        prompt_template: a format string with ``{question}`` (e.g. ``"USER: <image> {question} ASSISTANT:"``;
            a string prompt for a vision processor must hold its image placeholder); None: the question.
        on_error: an image file that cannot be fully decoded: ``"raise"`` raises
            :class:`.records.RecordValidationError` listing every such record; ``"skip"`` warns and drops them.

    Returns:
        one dict per good record with keys ``id``, ``prompt``, ``chosen``, ``rejected`` (str) and ``images``,
        ``corrupted_images`` (lists of ``{"bytes": bytes, "path": None}``, one and zero or one items): pass them
        to ``datasets.Dataset.from_list(rows, features=preference_features())``.

    Raises:
        ValueError: a bad ``on_error``, ``prompt_template`` or ``records`` item.
    """
    _check_args("preference_rows_from_records", on_error, prompt_template)
    rows, problems = _rows(records, prompt_template, {})
    return _finish("records", rows, problems, on_error)


def _dataset(rows: list[dict[str, Any]]) -> "datasets.Dataset":
    import datasets

    columns = {c: [r[c] for r in rows] for c in COLUMNS}
    return datasets.Dataset.from_dict(columns, features=preference_features())


def preference_dataset_from_records(
    records: Iterable[PreferenceRecord],
    *,
    prompt_template: str | None = None,
    on_error: OnError = "raise",
) -> "datasets.Dataset":
    """In-memory records (e.g. fresh from :func:`.build_pairs.make_pairs`) as a ``datasets.Dataset`` with the
    columns of the module docstring; arguments as :func:`preference_rows_from_records`."""
    _check_args("preference_dataset_from_records", on_error, prompt_template)
    rows, problems = _rows(records, prompt_template, {})
    return _dataset(_finish("records", rows, problems, on_error))


def _id_lines(path: Path) -> dict[str, int]:
    """Record id -> 1-based line of its first occurrence (the loader rejects later ones)."""
    lines: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue
            rid = raw.get("id") if isinstance(raw, dict) else None
            if isinstance(rid, (str, int)) and not isinstance(rid, bool):
                lines.setdefault(str(rid), lineno)
    return lines


def load_preference_dataset(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    prompt_template: str | None = None,
) -> "datasets.Dataset":
    """Loads a JSONL file of preference records as a ``datasets.Dataset`` in TRL's preference format.

    Records are validated by :func:`.records.load_preference_records` (fields, tags, files decoded whole,
    sizes; all problems in one error, or one warning when skipping), then every image is read as RGB.

    Args:
        path: the JSONL file; relative image paths inside it are taken from its folder.
        on_error: ``"raise"`` raises :class:`.records.RecordValidationError` (a ``ValueError``) listing every
            bad record with its line and id, a truncated image among them; ``"skip"`` warns with the same
            list and keeps the good records.
        prompt_template: a format string with ``{question}``; None: the prompt is the question itself.

    Returns:
        a ``datasets.Dataset`` with columns ``id``, ``prompt``, ``chosen``, ``rejected`` (str; tags kept),
        ``images`` (list of one PIL image) and ``corrupted_images`` (list of one PIL image, or empty when the
        record has no ``corrupted_image``), in file order; images decode as RGB.

    Raises:
        ValueError: a bad ``on_error`` or ``prompt_template``.
        FileNotFoundError: ``path`` is not a file.
        RecordValidationError: ``on_error="raise"`` and some record is bad.
    """
    _check_args("load_preference_dataset", on_error, prompt_template)
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"load_preference_dataset: `path` must be a str or os.PathLike; got {type(path).__name__}")
    path = Path(path)
    records = load_preference_records(path, on_error=on_error)  # every image decoded, all problems at once
    rows, problems = _rows(records, prompt_template, _id_lines(path))
    return _dataset(_finish(str(path), rows, problems, on_error))
