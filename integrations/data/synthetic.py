"""A deterministic synthetic medical VQA set: the embedded default of the demo and of the tests.

Each scan is a small grayscale chest-like image: a body ellipse with two darker lung fields and a bright
round lesion of known place (left or right lung, upper or lower half) and size (small or large), or no
lesion at all. "Left" is the patient's left, shown on the right of the image as radiographs are read.
Every scan comes with its lesion mask and box, and with questions:

* closed: side (left/right), level (upper/lower), size (small/large), presence (a lesion/no lesion);
* open: "Where is the lesion?", answered with side and level, with the three wrong places as known
  wrong answers to edit.

Answers are short sentences without punctuation, so that a word-level tokenizer decodes them exactly.
The set is a pure function of ``(num_images, seed, image_size)``: same arguments, same bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import QARecord, write_records

SIDES = ("left", "right")
LEVELS = ("upper", "lower")
SIZES = ("small", "large")

QUESTIONS = {
    "side": "Is the lesion in the left or the right lung?",
    "level": "Is the lesion in the upper or the lower part of the lung?",
    "size": "Is the lesion large or small?",
    "presence": "Is there a lesion in this scan?",
    "where": "Where is the lesion?",
}


@dataclass(frozen=True)
class Scan:
    """One synthetic scan's ground truth; ``side``/``level``/``size`` are None when there is no lesion."""

    index: int
    side: str | None
    level: str | None
    size: str | None
    center: tuple[float, float] | None  # (x, y) in pixels
    radius: float | None


def _draw_scan(index: int, rng: np.random.Generator, image_size: int, lesion_rate: float):
    s = float(image_size)
    yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5
    img = np.full((image_size, image_size), 18.0)
    body = ((xx - s / 2) / (0.46 * s)) ** 2 + ((yy - s / 2) / (0.48 * s)) ** 2 <= 1
    img[body] = 105.0
    lungs = []
    for cx in (0.30 * s, 0.70 * s):  # image-left lung = patient's right
        lung = ((xx - cx) / (0.15 * s)) ** 2 + ((yy - 0.48 * s) / (0.33 * s)) ** 2 <= 1
        img[lung] = 55.0
        lungs.append(lung)
    img += rng.normal(0.0, 6.0, size=img.shape)  # tissue texture, so no two scans are alike
    scan = Scan(index, None, None, None, None, None)
    mask = np.zeros((image_size, image_size), dtype=bool)
    if rng.random() < lesion_rate:
        side = SIDES[int(rng.integers(2))]
        level = LEVELS[int(rng.integers(2))]
        size = SIZES[int(rng.integers(2))]
        radius = (0.07 if size == "small" else 0.13) * s
        cx = (0.70 if side == "left" else 0.30) * s + rng.uniform(-0.04, 0.04) * s
        cy = (0.32 if level == "upper" else 0.64) * s + rng.uniform(-0.04, 0.04) * s
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        img[mask] = 205.0 + rng.normal(0.0, 6.0, size=int(mask.sum()))
        scan = Scan(index, side, level, size, (float(cx), float(cy)), float(radius))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, scan


def _questions(scan: Scan, rid: str, image: str, mask: str | None, bbox) -> list[QARecord]:
    common = dict(image=image, lesion_mask=mask, lesion_bbox=bbox)
    if scan.side is None:
        return [
            QARecord(
                id=f"{rid}-presence", question=QUESTIONS["presence"], ground_truth="There is no lesion",
                answer_type="closed", candidates=("a lesion", "no lesion"), wrong_answers=("There is a lesion",),
                **common,
            )
        ]

    def other(options, value):
        return options[1 - options.index(value)]

    where = f"The lesion is in the {scan.level} {scan.side} lung"
    wrong_where = tuple(
        f"The lesion is in the {lv} {sd} lung" for lv in LEVELS for sd in SIDES if (lv, sd) != (scan.level, scan.side)
    )
    return [
        QARecord(
            id=f"{rid}-side", question=QUESTIONS["side"], ground_truth=f"The lesion is in the {scan.side} lung",
            answer_type="closed", candidates=SIDES,
            wrong_answers=(f"The lesion is in the {other(SIDES, scan.side)} lung",), **common,
        ),
        QARecord(
            id=f"{rid}-level", question=QUESTIONS["level"],
            ground_truth=f"The lesion is in the {scan.level} part of the lung", answer_type="closed",
            candidates=LEVELS, wrong_answers=(f"The lesion is in the {other(LEVELS, scan.level)} part of the lung",),
            **common,
        ),
        QARecord(
            id=f"{rid}-size", question=QUESTIONS["size"], ground_truth=f"The lesion is {scan.size}",
            answer_type="closed", candidates=SIZES, wrong_answers=(f"The lesion is {other(SIZES, scan.size)}",),
            **common,
        ),
        QARecord(
            id=f"{rid}-presence", question=QUESTIONS["presence"], ground_truth="There is a lesion",
            answer_type="closed", candidates=("a lesion", "no lesion"), wrong_answers=("There is no lesion",),
            **common,
        ),
        QARecord(
            id=f"{rid}-where", question=QUESTIONS["where"], ground_truth=where, answer_type="open",
            wrong_answers=wrong_where, **common,
        ),
    ]


def make_synthetic_vqa(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 64,
    seed: int = 0,
    image_size: int = 32,
    lesion_rate: float = 0.85,
    split: str = "train",
) -> Path:
    """Writes ``num_images`` scans, their masks and their question records under ``out_dir``.

    Args:
        out_dir: folder; ``images/``, ``masks/`` and ``<split>.jsonl`` are written inside.
        num_images: scans to draw (each gives 5 question records, 1 when it has no lesion).
        seed: the generator seed; use different seeds for train and held-out splits.
        image_size: side of the square uint8 grayscale images, >= 16.
        lesion_rate: probability that a scan has a lesion, in [0, 1].
        split: name of the split: record ids and the JSONL file name.

    Returns:
        the path of the JSONL file of :class:`QARecord` (paths in it relative to ``out_dir``).
    """
    from PIL import Image

    for name, value, low in (("num_images", num_images, 1), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"make_synthetic_vqa: `{name}` must be an int >= {low}; got {value!r}")
    if not 0.0 <= lesion_rate <= 1.0:
        raise ValueError(f"make_synthetic_vqa: `lesion_rate` must lie in [0, 1]; got {lesion_rate!r}")
    if not split or not split.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"make_synthetic_vqa: `split` must be a short alphanumeric name; got {split!r}")
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, image_size])
    records: list[QARecord] = []
    for i in range(num_images):
        img, mask, scan = _draw_scan(i, rng, image_size, lesion_rate)
        rid = f"synth-{split}-{i:05d}"
        image_path = out / "images" / f"{rid}.png"
        Image.fromarray(img).save(image_path)
        mask_path, bbox = None, None
        if scan.side is not None:
            mask_path = out / "masks" / f"{rid}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
            ys, xs = np.nonzero(mask)
            bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        records += _questions(scan, rid, str(image_path), None if mask_path is None else str(mask_path), bbox)
    path = out / f"{split}.jsonl"
    write_records(path, records)
    return path


def vocabulary() -> list[str]:
    """Every word the synthetic questions and answers use, for building a word-level tokenizer."""
    import re

    words: set[str] = set()
    texts = list(QUESTIONS.values()) + [
        "The lesion is in the upper left lung", "The lesion is in the lower part of the lung",
        "The lesion is large small right", "There is a lesion no",
    ]
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]", t))
    return sorted(words)
