"""Question records from the released files of SLAKE, VQA-RAD and IU-Xray (or their Hugging Face parquet copies).

Command line::

    firempo-import slake --root Slake1.0 --split train --out slake/train.jsonl
    firempo-import vqa-rad --root VQA_RAD --split test --out vqa-rad/test.jsonl
    firempo-import iu-xray --root iu_xray --split test --out iu-xray/test.jsonl

(also ``python -m firempo_kernels.integrations.data.importers``). What each set's folder must hold, and what
each record gets, is in ``docs/datasets.md``. In short:

* **SLAKE** (``train.json``, ``validate.json`` or ``validation.json``, ``test.json``; images under ``imgs/``):
  English questions only unless ``--languages`` says otherwise; a closed question's candidates are the answers
  to closed questions of the same file that the question names (``yes``/``no`` for yes/no answers); where an
  image's own segmentation (``mask.png``, grey values named in ``mask.txt``) or boxes (``detection.json``)
  mark a label of :data:`SLAKE_LESION_LABELS` (``--lesion-labels`` to change the list), its records get a
  ``lesion_mask`` written under ``<out stem>.masks/``.
* **VQA-RAD** (``VQA_RAD Dataset Public.json`` of the official release, split by ``phrase_type``, or the
  ``trainset.json`` / ``testset.json`` pair most code reads; images in ``VQA_RAD Image Folder/`` or
  ``images/``): repeated (image, question, answer) triples of a split are kept once unless
  ``--keep-duplicates``; no lesion masks.
* **IU-Xray** (R2Gen's ``annotation.json`` with ``images/``): one record per study, the report as the ground
  truth of a fixed report question, the first view as the image (the others listed in ``views``).
* **Parquet copies** (``--root`` holding ``*.parquet`` files named by split, with ``image``, ``question`` and
  ``answer`` columns, and ``q_lang`` / ``answer_type`` where present): the images are written out under
  ``<out stem>.images/``, since they live inside the parquet files.

Ids are stable (``slake-<qid>``, ``vqa-rad-<qid>``, ``iu-xray-<study id>``; parquet rows ``<set>-<split>-<row>``),
images are referenced where they lie (``--copy-images`` copies them beside the output), and every problem of
the release (a missing file, a malformed entry, an unreadable image or mask) is listed in one error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..cli import atomic_write, check_writable_file, run_command
from .records import QARecord, RecordProblem, qa_records_from_json, write_records

SETS = ("slake", "vqa-rad", "iu-xray")

#: SLAKE's segmentation labels (its ``mask.txt``: grey value -> label), used when the release has no mask.txt.
SLAKE_MASK_LABELS: dict[int, str] = {
    30: "Left Humerus Head", 35: "Right Humerus Head", 40: "Larynx", 45: "Right Femoral Head",
    50: "Left Femoral Head", 55: "Brain Stem", 60: "Duodenum", 65: "Tooth", 70: "Liver", 75: "Trachea",
    80: "Left Eye", 90: "Right Eye", 95: "Brain Edema", 105: "Rectum", 110: "Esophagus", 120: "Left Ear",
    125: "Bladder", 130: "Right Ear", 135: "Left Kidney", 140: "Brain Non-enhancing Tumor", 145: "Spinal Cord",
    150: "Kidney Cancer", 155: "Right Kidney", 160: "Left Temporal Lobe", 165: "Stomach",
    170: "Right Temporal Lobe", 175: "Liver Cancer", 180: "Heart", 185: "Brain Enhancing Tumor",
    200: "Left Mandible", 205: "Small Bowel", 210: "Right Mandible", 215: "Left Lung", 225: "Right Lung",
    230: "Spleen", 235: "Colon", 240: "Left Parotid", 245: "Lung Cancer", 250: "Right Parotid",
}

#: The labels that count as a lesion: the abnormal classes of SLAKE's segmentation, and the ChestX-ray8 findings
#: its chest X-rays carry as boxes in ``detection.json``. Organs are not lesions.
SLAKE_LESION_LABELS: tuple[str, ...] = (
    "Brain Edema", "Brain Enhancing Tumor", "Brain Non-enhancing Tumor", "Kidney Cancer", "Liver Cancer",
    "Lung Cancer", "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax",
)

#: The question of IU-Xray's records (the set has reports, not questions).
REPORT_QUESTION = "Describe the findings of this chest X-ray."

YES_NO = ("yes", "no")


@dataclass
class Imported:
    """What an importer read: JSON objects of question records (absolute paths) and what it left out, counted."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    problems: list[RecordProblem] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)

    def problem(self, rid: str | None, message: str) -> None:
        self.problems.append(RecordProblem(0, rid, message))


def _load_json(path: Path, out: Imported) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        out.problem(None, f"{path}: not readable JSON ({type(e).__name__}: {e})")
        return None


def _text(entry: dict, key: str, rid: str | None, out: Imported, where: str) -> str | None:
    v = entry.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)  # VQA-RAD writes numeric answers as numbers
    if not isinstance(v, str) or not v.strip():
        out.problem(rid, f"{where}: `{key}` must be a non-empty string; got {v!r}")
        return None
    return v.strip()


def _question_entry(
    e: dict, image_key: str, rid: str, out: Imported, where: str
) -> tuple[str, str, str, str] | None:
    """``(image name, question, answer, OPEN or CLOSED)`` of a released question, or None (problems noted)."""
    values = [_text(e, key, rid, out, where) for key in (image_key, "question", "answer")]
    kind = str(e.get("answer_type", "")).strip().upper()
    if kind not in ("OPEN", "CLOSED"):
        out.problem(rid, f"{where}: `answer_type` must be OPEN or CLOSED; got {e.get('answer_type')!r}")
        return None
    return None if None in values else (*values, kind)


def _closed_vocabulary(entries: Sequence[Any]) -> list[str]:
    """The answers of a file's closed questions, first-seen order: the options closed questions may name."""
    return list(dict.fromkeys(
        str(e["answer"]).strip() for e in entries if isinstance(e, dict) and e.get("answer") is not None
        and str(e.get("answer_type", "")).strip().upper() == "CLOSED"
    ))


def _unique_id(base: str, seen: Counter) -> str:
    """``base``, or ``base-2``, ``base-3``... for its later repeats (stable for a given file)."""
    seen[base] += 1
    return base if seen[base] == 1 else f"{base}-{seen[base]}"


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def closed_candidates(question: str, answer: str, vocabulary: Sequence[str]) -> list[str]:
    """The possible answers of a closed question: ``yes``/``no`` for a yes/no answer, else the answer and the
    other ``vocabulary`` entries (closed answers of the same set) that the question names as whole words.

    Args:
        question, answer: the question and its right answer.
        vocabulary: the closed answers of the set, in a fixed order (the candidates keep it).

    Returns:
        the candidates, the answer's own among them; fewer than 2 when the question names no alternative.
    """
    if _norm(answer) in YES_NO:
        return list(YES_NO)
    def inside(a: str, b: str) -> bool:  # the words of a are a run of the words of b
        return f" {_norm(a)} " in f" {_norm(b)} "

    right = _norm(answer)
    named: dict[str, str] = {}
    for v in vocabulary:
        k = _norm(v)
        if k and k not in YES_NO and k not in named and inside(v, question) and k != right:
            named[k] = v
    # "left" within "left lung": of phrases that overlap, the one the answer's length fits is the option
    others = [v for v in named.values() if not inside(v, answer) and not inside(answer, v)]
    size = len(right.split())
    kept = [
        v for v in others
        if not any(w is not v and (inside(v, w) or inside(w, v))
                   and abs(len(_norm(w).split()) - size) < abs(len(_norm(v).split()) - size) for w in others)
    ]
    return [answer, *kept]


def _closed_fields(question: str, answer: str, vocabulary: Sequence[str], out: Imported) -> dict[str, Any]:
    cands = closed_candidates(question, answer, vocabulary)
    if len(cands) >= 2:
        return {"answer_type": "closed", "candidates": cands}
    out.notes["closed questions naming no alternative, written as open"] += 1
    return {"answer_type": "open"}


# ---------------------------------------------------------------------------------------------------- SLAKE


def _slake_label_map(root: Path, out: Imported) -> dict[int, str]:
    path = root / "mask.txt"
    if not path.is_file():
        return dict(SLAKE_MASK_LABELS)
    labels: dict[int, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        value, sep, label = line.partition(":")
        if not sep or not value.strip().isdigit() or not label.strip():
            out.problem(None, f"{path} line {n}: must be `<grey value>:<label>`; got {line!r}")
            continue
        labels[int(value)] = label.strip()
    return labels


def _grey_labels(path: Path) -> np.ndarray:
    """The label image as 2-D uint8 grey values: an RGB mask must have equal channels (grey saved as colour)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB") if im.mode == "P" else im)
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if not (arr == arr[..., :1]).all():
            raise ValueError("its channels differ: a label mask must hold one grey value per pixel")
        arr = arr[..., 0]
    return arr.astype(np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def slake_lesion_mask(
    image: Path, lesion_values: set[int], lesion_labels: set[str], out: Imported
) -> np.ndarray | None:
    """The lesion pixels of one SLAKE image (``imgs/xmlabN/source.jpg``), bool ``[H, W]``, or None without one.

    The segmentation ``mask.png`` counts where it marks a lesion value; otherwise the ``detection.json`` boxes
    (``[{label: [x, y, width, height]}, ...]``, pixels) of lesion labels are filled. Problems go to ``out``.
    """
    try:
        width, height = _image_size(image)
    except Exception:  # noqa: BLE001 - PIL raises several types; the record check reports the image itself
        return None
    folder = image.parent
    seg = folder / "mask.png"
    if seg.is_file() and lesion_values:  # no lesion label has a grey value: the segmentation is not read
        try:
            grey = _grey_labels(seg)
        except Exception as e:  # noqa: BLE001 - PIL raises several types for unreadable files
            out.problem(None, f"{seg}: not a readable label mask ({type(e).__name__}: {e})")
            return None
        if grey.shape != (height, width):
            out.problem(None, f"{seg}: {grey.shape[1]}x{grey.shape[0]} but the image is {width}x{height}")
            return None
        mask = np.isin(grey, sorted(lesion_values))
        if mask.any():
            out.notes["images with a lesion from their segmentation"] += 1
            return mask
    boxes_path = folder / "detection.json"
    if not boxes_path.is_file():
        return None
    boxes = _load_json(boxes_path, out)
    if boxes is None:
        return None
    mask = np.zeros((height, width), bool)
    if not isinstance(boxes, list):
        out.problem(None, f"{boxes_path}: must be a list of {{label: [x, y, width, height]}}; got {type(boxes).__name__}")
        return None
    for item in boxes:
        pairs = item.items() if isinstance(item, dict) else [(None, item)]
        for label, box in pairs:
            ok = (isinstance(label, str) and isinstance(box, list) and len(box) == 4
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box))
            if not ok:
                out.problem(None, f"{boxes_path}: entries must be {{label: [x, y, width, height]}}; got {item!r:.80}")
                continue
            if label not in lesion_labels:
                continue
            x, y, w, h = box
            if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
                out.problem(None, f"{boxes_path}: box {box} of {label!r} is empty or outside the {width}x{height} image")
                continue
            mask[int(round(y)) : int(round(y + h)), int(round(x)) : int(round(x + w))] = True
    if mask.any():
        out.notes["images with a lesion from their boxes"] += 1
        return mask
    return None


def _slake_file(root: Path, split: str) -> Path:
    names = {"train": ["train.json"], "validation": ["validate.json", "validation.json"], "test": ["test.json"]}
    for name in names[split]:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"--root: no {' or '.join(names[split])} in {root} (the SLAKE release folder)")


def import_slake(
    root: str | os.PathLike,
    split: str,
    *,
    masks_dir: str | os.PathLike,
    languages: Sequence[str] = ("en",),
    lesion_labels: Sequence[str] = SLAKE_LESION_LABELS,
) -> Imported:
    """SLAKE's released ``<split>.json`` as question records; lesion masks written under ``masks_dir``.

    Args:
        root: the release folder (``train.json``, ``validate.json`` or ``validation.json``, ``test.json``,
            ``imgs/xmlabN/source.jpg`` with ``mask.png`` and ``detection.json``, optionally ``mask.txt``).
        split: ``train``, ``validation`` or ``test``.
        masks_dir: where the lesion masks (uint8 PNG, 255 = lesion, the image's size) are written.
        languages: the ``q_lang`` values kept (SLAKE mixes English ``en`` and Chinese ``zh``).
        lesion_labels: the segmentation and box labels that count as a lesion (see :data:`SLAKE_LESION_LABELS`).
    """
    root = Path(root)
    out = Imported()
    entries = _load_json(_slake_file(root, split), out)
    if entries is None:
        return out
    if not isinstance(entries, list):
        out.problem(None, f"{split}: the file must hold a list of question objects; got {type(entries).__name__}")
        return out
    label_map = _slake_label_map(root, out)
    wanted = set(lesion_labels)
    unknown = wanted - set(label_map.values()) - set(SLAKE_LESION_LABELS)
    if unknown:
        out.notes[f"lesion labels not in the segmentation's labels (boxes only): {sorted(unknown)}"] += 1
    lesion_values = {v for v, label in label_map.items() if label in wanted}
    kept = [e for e in entries if isinstance(e, dict) and e.get("q_lang") in languages]
    out.notes[f"questions in other languages than {list(languages)} left out"] += sum(
        isinstance(e, dict) and e.get("q_lang") not in languages for e in entries
    )
    vocabulary = _closed_vocabulary(kept)
    masks: dict[str, str | None] = {}
    seen: Counter = Counter()
    for n, e in enumerate(entries):
        if not isinstance(e, dict):
            out.problem(None, f"{split} entry {n}: must be a JSON object; got {type(e).__name__}")
            continue
        if e.get("q_lang") not in languages:
            continue
        qid = e.get("qid")
        rid = _unique_id(f"slake-{qid if qid is not None else n}", seen)
        where = f"{split} entry {n}"
        fields = _question_entry(e, "img_name", rid, out, where)
        if fields is None:
            continue
        img_name, question, answer, kind = fields
        image = root / "imgs" / img_name
        obj: dict[str, Any] = {"id": rid, "image": str(image), "question": question, "ground_truth": answer}
        obj.update(_closed_fields(question, answer, vocabulary, out) if kind == "CLOSED" else {"answer_type": "open"})
        if img_name not in masks:
            masks[img_name] = None
            mask = slake_lesion_mask(image, lesion_values, wanted, out) if image.is_file() else None
            if mask is not None:
                masks[img_name] = _write_mask(Path(masks_dir) / f"{image.parent.name}.png", mask)
        if masks[img_name] is not None:
            obj["lesion_mask"] = masks[img_name]
        obj.update({"source": "slake", "source_answer_type": kind,
                    **{k: e[k] for k in ("qid", "img_id", "location", "modality", "content_type") if k in e}})
        out.objects.append(obj)
    return out


def _write_mask(path: Path, mask: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


# -------------------------------------------------------------------------------------------------- VQA-RAD

_VQA_RAD_PUBLIC = "VQA_RAD Dataset Public.json"
_VQA_RAD_IMAGES = ("VQA_RAD Image Folder", "images", ".")


def import_vqa_rad(root: str | os.PathLike, split: str, *, keep_duplicates: bool = False) -> Imported:
    """VQA-RAD's released questions of ``split`` (``train`` or ``test``) as question records.

    Args:
        root: the folder with ``VQA_RAD Dataset Public.json`` (test = ``phrase_type`` starting with ``test``)
            or ``trainset.json`` / ``testset.json``, and the images in ``VQA_RAD Image Folder/``, ``images/``
            or beside the JSON.
        keep_duplicates: keep repeated (image, question, answer) triples of the split (dropped by default).
    """
    root = Path(root)
    out = Imported()
    if (root / _VQA_RAD_PUBLIC).is_file():
        entries = _load_json(root / _VQA_RAD_PUBLIC, out)
        if isinstance(entries, list):
            is_test = [str(e.get("phrase_type", "")).startswith("test") if isinstance(e, dict) else False
                       for e in entries]
            entries = [e for e, t in zip(entries, is_test) if t == (split == "test")]
    elif (root / f"{split}set.json").is_file():
        entries = _load_json(root / f"{split}set.json", out)
    else:
        raise FileNotFoundError(f"--root: no {_VQA_RAD_PUBLIC!r} nor {split}set.json in {root} (the VQA-RAD folder)")
    if entries is None:
        return out
    if not isinstance(entries, list):
        out.problem(None, f"{split}: the file must hold a list of question objects; got {type(entries).__name__}")
        return out
    folders = [root / d for d in _VQA_RAD_IMAGES if (root / d).is_dir()]
    vocabulary = _closed_vocabulary(entries)
    seen: Counter = Counter()
    triples: set[tuple[str, str, str]] = set()
    for n, e in enumerate(entries):
        if not isinstance(e, dict):
            out.problem(None, f"{split} entry {n}: must be a JSON object; got {type(e).__name__}")
            continue
        where = f"{split} entry {n}"
        rid = _unique_id(f"vqa-rad-{e.get('qid', n)}", seen)
        fields = _question_entry(e, "image_name", rid, out, where)
        if fields is None:
            continue
        name, question, answer, kind = fields
        key = (name, _norm(question), _norm(answer))
        if key in triples and not keep_duplicates:
            out.notes["repeated (image, question, answer) triples left out"] += 1
            continue
        triples.add(key)
        image = next((d / name for d in folders if (d / name).is_file()), (folders or [root])[0] / name)
        obj: dict[str, Any] = {"id": rid, "image": str(image), "question": question, "ground_truth": answer}
        obj.update(_closed_fields(question, answer, vocabulary, out) if kind == "CLOSED" else {"answer_type": "open"})
        obj.update({"source": "vqa-rad", "source_answer_type": kind,
                    **{k: e[k] for k in ("qid", "image_organ", "question_type") if k in e}})
        out.objects.append(obj)
    return out


# -------------------------------------------------------------------------------------------------- IU-Xray


def import_iu_xray(root: str | os.PathLike, split: str, *, question: str = REPORT_QUESTION) -> Imported:
    """IU-Xray's studies of ``split`` (``train``, ``val`` or ``test``) from R2Gen's ``annotation.json``.

    Args:
        root: the folder with ``annotation.json`` (``{"train": [{"id", "report", "image_path": [...], "split"}],
            "val": [...], "test": [...]}``) and ``images/`` (``image_path`` is relative to it).
        question: the question every record asks (the report is its ground truth).
    """
    root = Path(root)
    out = Imported()
    path = root / "annotation.json"
    if not path.is_file():
        raise FileNotFoundError(f"--root: no annotation.json in {root} (the IU-Xray folder in R2Gen's layout)")
    data = _load_json(path, out)
    if data is None:
        return out
    if not isinstance(data, dict) or not isinstance(data.get(split), list):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        out.problem(None, f"{path}: must map {split!r} to a list of studies; got {got}")
        return out
    seen: Counter = Counter()
    for n, e in enumerate(data[split]):
        where = f"{split} study {n}"
        if not isinstance(e, dict):
            out.problem(None, f"{where}: must be a JSON object; got {type(e).__name__}")
            continue
        rid = _unique_id(f"iu-xray-{e.get('id', n)}", seen)
        report = _text(e, "report", rid, out, where)
        views = e.get("image_path")
        if not isinstance(views, list) or not views or not all(isinstance(v, str) and v for v in views):
            out.problem(rid, f"{where}: `image_path` must be a non-empty list of paths; got {views!r}")
            continue
        missing = [v for v in views[1:] if not (root / "images" / v).is_file()]
        if missing:
            out.problem(rid, f"{where}: view file(s) not found: {[str(root / 'images' / v) for v in missing]}")
        if report is None:
            continue
        out.objects.append({
            "id": rid, "image": str(root / "images" / views[0]), "question": question, "ground_truth": report,
            "answer_type": "open", "task": "report", "source": "iu-xray",
            "views": [str(root / "images" / v) for v in views],
        })
    return out


# -------------------------------------------------------------------------------------------------- parquet


def _parquet_files(root: Path, split: str) -> list[Path]:
    aliases = {"validation": ("validation", "validate", "val"), "val": ("validation", "validate", "val")}
    names = aliases.get(split, (split,))
    files = sorted(p for p in root.rglob("*.parquet") if any(re.match(rf"{a}[-_.]", p.name) for a in names))
    if not files:
        raise FileNotFoundError(f"--root: no parquet file of split {split!r} ({'/'.join(names)}-*.parquet) in {root}")
    return files


def import_parquet(
    name: str, root: str | os.PathLike, split: str, *, images_dir: str | os.PathLike,
    languages: Sequence[str] = ("en",),
) -> Imported:
    """A Hugging Face parquet copy of SLAKE or VQA-RAD (``image``, ``question``, ``answer`` columns; ``q_lang``,
    ``answer_type`` and ``qid`` used where present), read with ``datasets``; images written to ``images_dir``.

    Without ``answer_type``, yes/no answers make closed questions and every other answer an open one.
    """
    import datasets

    if name not in ("slake", "vqa-rad"):
        raise ValueError(f"import_parquet: `name` must be 'slake' or 'vqa-rad'; got {name!r}")
    root = Path(root)
    files = _parquet_files(root, split)
    out = Imported()
    with tempfile.TemporaryDirectory() as cache:  # nothing left in the user's Hugging Face cache
        ds = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache, keep_in_memory=True)
        missing = [c for c in ("image", "question", "answer") if c not in ds.column_names]
        if missing:
            raise ValueError(f"--root: the parquet files have no column(s) {missing}; got {ds.column_names}")
        ds = ds.cast_column("image", datasets.Image(decode=False))
        rows = list(ds)
    if "q_lang" in ds.column_names:
        before = len(rows)
        rows = [r for r in rows if r["q_lang"] in languages]
        out.notes[f"questions in other languages than {list(languages)} left out"] += before - len(rows)

    def kind_of(r: dict) -> str:
        if "answer_type" in r and r["answer_type"]:
            return str(r["answer_type"]).strip().upper()
        return "CLOSED" if _norm(str(r["answer"])) in YES_NO else "OPEN"

    vocabulary = list(dict.fromkeys(str(r["answer"]).strip() for r in rows if kind_of(r) == "CLOSED"))
    seen: Counter = Counter()
    written: dict[bytes, str] = {}
    for n, r in enumerate(rows):
        base = f"{name}-{r['qid']}" if r.get("qid") is not None else f"{name}-{split}-{n:05d}"
        rid = _unique_id(base, seen)
        where = f"{split} row {n}"
        question, answer = _text(r, "question", rid, out, where), _text(r, "answer", rid, out, where)
        img = r["image"] or {}
        data = img.get("bytes") or (Path(img["path"]).read_bytes() if img.get("path") and Path(img["path"]).is_file() else None)
        if not data:
            out.problem(rid, f"{where}: the row has no image bytes")
            continue
        if question is None or answer is None:
            continue
        if data not in written:
            written[data] = _write_image(Path(images_dir), rid, data, out)
        obj: dict[str, Any] = {"id": rid, "image": written[data], "question": question, "ground_truth": answer}
        kind = kind_of(r)
        obj.update(_closed_fields(question, answer, vocabulary, out) if kind == "CLOSED" else {"answer_type": "open"})
        obj.update({"source": name, "source_answer_type": kind})
        out.objects.append(obj)
    return out


def _write_image(folder: Path, rid: str, data: bytes, out: Imported) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = (im.format or "png").lower().replace("jpeg", "jpg")
    except Exception:  # noqa: BLE001 - written as is; the record check reports it as unreadable
        ext = "bin"
    path = folder / f"{rid}.{ext}"
    with atomic_write(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------------------------------------ the command


def _copy_images(objects: list[dict[str, Any]], root: Path, folder: Path) -> None:
    """Copies every referenced image (and view) below ``folder``, keeping its path relative to ``root``."""
    done: dict[str, str] = {}

    def copy(p: str) -> str:
        if p not in done:
            src = Path(p)
            if not src.is_file():
                return p  # left for the record check to report
            dst = folder / src.resolve().relative_to(root.resolve())
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            done[p] = str(dst)
        return done[p]

    for obj in objects:
        obj["image"] = copy(obj["image"])
        if "views" in obj:
            obj["views"] = [copy(v) for v in obj["views"]]


def import_records(
    name: str,
    root: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    *,
    languages: Sequence[str] = ("en",),
    lesion_labels: Sequence[str] = SLAKE_LESION_LABELS,
    keep_duplicates: bool = False,
    copy_images: bool = False,
    question: str = REPORT_QUESTION,
) -> tuple[list[QARecord], Counter]:
    """Imports one split of a set and writes it as question records to ``out`` (JSONL, paths relative to it).

    Returns ``(records, notes)``: the records written and the counts of what was left out or changed.

    Raises:
        ValueError: ``name`` or ``split`` unknown.
        FileNotFoundError: ``root`` holds no release file of the set.
        RecordValidationError: listing every problem of the release at once (nothing is written then, but the
            lesion masks and parquet images already extracted, which a rerun rewrites identically).
    """
    if name not in SETS:
        raise ValueError(f"import_records: `name` must be one of {SETS}; got {name!r}")
    splits = {"slake": ("train", "validation", "test"), "vqa-rad": ("train", "test"),
              "iu-xray": ("train", "val", "test")}[name]
    split = {"val": "validation"}.get(split, split) if name == "slake" else split
    split = "val" if name == "iu-xray" and split == "validation" else split
    if split not in splits:
        raise ValueError(f"--split: {name} has the splits {list(splits)}; got {split!r}")
    # records hold paths relative to their own file: every path built here must not depend on the cwd
    root, out = Path(root).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--root: no folder at {root}")
    stem = out.parent / out.stem
    if any(root.glob("*.json")) or name == "iu-xray" or not any(root.rglob("*.parquet")):
        if name == "slake":
            imported = import_slake(root, split, masks_dir=f"{stem}.masks", languages=languages,
                                    lesion_labels=lesion_labels)
        elif name == "vqa-rad":
            imported = import_vqa_rad(root, split, keep_duplicates=keep_duplicates)
        else:
            imported = import_iu_xray(root, split, question=question)
        if copy_images and imported.objects:
            _copy_images(imported.objects, root, Path(f"{stem}.images"))
    else:
        imported = import_parquet(name, root, split, images_dir=f"{stem}.images", languages=languages)
    if not imported.objects and not imported.problems:
        raise ValueError(f"--root: split {split!r} of {root} holds no question (languages {list(languages)})")
    records = qa_records_from_json(imported.objects, out.parent, source=f"{name} {split} in {root}",
                                   problems=imported.problems)
    write_records(out, records)
    return records, imported.notes


def main(argv: Sequence[str] | None = None) -> int:
    """``firempo-import``: a dataset's released files in, question records (JSONL) out."""
    ap = argparse.ArgumentParser(prog="firempo-import", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=SETS)
    ap.add_argument("--root", required=True, help="the set's release folder (or a folder of its parquet files)")
    ap.add_argument("--split", required=True, help="slake: train/validation/test; vqa-rad: train/test; "
                    "iu-xray: train/val/test")
    ap.add_argument("--out", required=True, help="the question records to write (JSONL)")
    ap.add_argument("--languages", default="en", help="SLAKE: comma-separated q_lang values kept (default en)")
    ap.add_argument("--lesion-labels", default=None,
                    help="SLAKE: comma-separated labels that count as a lesion (default: docs/datasets.md)")
    ap.add_argument("--keep-duplicates", action="store_true", help="VQA-RAD: keep repeated triples")
    ap.add_argument("--copy-images", action="store_true", help="copy the images beside --out (<out stem>.images/)")
    ap.add_argument("--question", default=REPORT_QUESTION, help="IU-Xray: the question the report answers")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)

    def body() -> int:
        check_writable_file(args.out, "--out")
        labels = SLAKE_LESION_LABELS if args.lesion_labels is None else tuple(
            s.strip() for s in args.lesion_labels.split(",") if s.strip())
        records, notes = import_records(
            args.dataset, args.root, args.split, args.out, languages=tuple(args.languages.split(",")),
            lesion_labels=labels, keep_duplicates=args.keep_duplicates, copy_images=args.copy_images,
            question=args.question,
        )
        kinds = Counter(r.answer_type for r in records)
        masks = sum(r.lesion_mask is not None for r in records)
        print(f"firempo-import: {len(records)} records ({kinds['closed']} closed, {kinds['open']} open, "
              f"{masks} with a lesion mask) written to {Path(args.out).resolve()}")
        for what, n in sorted(notes.items()):
            if n:
                print(f"  {what}: {n}")
        return 0

    return run_command("firempo-import", body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
