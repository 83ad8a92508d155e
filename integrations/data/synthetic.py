"""A deterministic synthetic medical VQA set: the embedded default of the demo and of the tests.

Each scan is a small grayscale chest-like image: a body ellipse with two darker lung fields crossed by faint
ribs, textured tissue (smooth blotches and fine grain), and a faint soft-edged nodule of known place (left or
right lung, upper or lower half), size (small or large, each a spread of radii) and contrast (14-40 grey
levels over tissue that varies by about 8), lying inside its lung field; or no lesion at all. The faintest
lesions are hard to tell from the texture, so reading a scan is a skill a model has to learn, and one it can
have in part. "Left" is the patient's left, shown on the right of the image as radiographs are read. Every scan
comes with its lesion mask (where the nodule stands at least half its height) and box, and with questions:

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

from ._filters import gaussian_taps
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
    contrast: float | None = None  #: grey levels the lesion's centre stands above the lung tissue


# Anatomy, in fractions of the image side: the lungs' centres (image-left lung = patient's right) and their
# half-axes. The detectors of :mod:`.evidence` find the lungs from the pixels, not from these numbers.
LUNG_CENTERS_X = (0.30, 0.70)
LUNG_CENTER_Y = 0.48
LUNG_HALF_AXES = (0.15, 0.33)
# Lesion radii (fractions of the side) of the two size classes, and the contrast range in grey levels. A
# contrast of 14-40 over tissue whose texture has a standard deviation of about 8 makes the lesion faint:
# visible to a filter matched to it, not the brightest thing in the image (the body is 50 levels brighter
# than the lung).
RADIUS_RANGE = {"small": (0.055, 0.08), "large": (0.105, 0.135)}
CONTRAST_RANGE = (14.0, 40.0)
QUESTION_KINDS = ("side", "level", "size", "presence", "where")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], width: float) -> np.ndarray:
    """Unit-variance Gaussian noise blurred by a Gaussian of ``width`` pixels: tissue-like texture."""
    noise = rng.normal(0.0, 1.0, size=shape)
    taps = gaussian_taps(width)
    radius = len(taps) // 2
    for axis in (0, 1):
        noise = np.apply_along_axis(lambda v: np.convolve(np.pad(v, radius, mode="wrap"), taps, "valid"), axis, noise)
    return noise / noise.std()


def _draw_scan(index: int, rng: np.random.Generator, image_size: int, lesion_rate: float,
               contrast_range: tuple[float, float] = CONTRAST_RANGE):
    s = float(image_size)
    yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5
    img = np.full((image_size, image_size), 18.0)
    body = ((xx - s / 2) / (0.46 * s)) ** 2 + ((yy - s / 2) / (0.48 * s)) ** 2 <= 1
    img[body] = 105.0
    lungs = []
    ax, ay = LUNG_HALF_AXES
    for cx in LUNG_CENTERS_X:
        lung = ((xx - cx * s) / (ax * s)) ** 2 + ((yy - LUNG_CENTER_Y * s) / (ay * s)) ** 2 <= 1
        img[lung] = 55.0
        lungs.append(lung)
    # Ribs: faint bright bands across both lungs at a per-scan phase, so brightness alone is no lesion.
    period = 0.16 * s
    phase = rng.uniform(0, period)
    ribs = 7.0 * np.exp(-0.5 * (((yy - phase) % period - period / 2) / (0.025 * s)) ** 2)
    img[lungs[0] | lungs[1]] += ribs[lungs[0] | lungs[1]]
    # Texture: smooth blotches plus fine grain, about 8 grey levels in all.
    img += 6.5 * _smooth_noise(rng, img.shape, 0.04 * s) + rng.normal(0.0, 4.0, size=img.shape)
    scan = Scan(index, None, None, None, None, None)
    mask = np.zeros((image_size, image_size), dtype=bool)
    if rng.random() < lesion_rate:
        side = SIDES[int(rng.integers(2))]
        level = LEVELS[int(rng.integers(2))]
        size = SIZES[int(rng.integers(2))]
        lung_x = LUNG_CENTERS_X[1] if side == "left" else LUNG_CENTERS_X[0]
        radius = rng.uniform(*RADIUS_RANGE[size]) * s
        lung = lungs[1] if side == "left" else lungs[0]
        # Inside its lung: the centre is drawn in the lung's half for the level, and redrawn until every pixel
        # of the disc lies in the lung field.
        for _ in range(1000):
            cx = (lung_x + rng.uniform(-0.6, 0.6) * ax) * s
            cy = (LUNG_CENTER_Y + (-1 if level == "upper" else 1) * rng.uniform(0.2, 0.75) * ay) * s
            r2 = (xx - cx) ** 2 + (yy - cy) ** 2
            mask = r2 <= radius**2
            if mask.any() and not (mask & ~lung).any():
                break
        else:  # unreachable at the shipped radii; a guard against edits that make the lesion too large
            raise AssertionError(f"no place for a {size} lesion in the {side} lung at image_size {image_size}")
        contrast = rng.uniform(*contrast_range)
        # A soft-edged nodule: flat top, Gaussian shoulder; the mask is its disc, at whose edge it still stands at
        # a third of its height.
        profile = np.exp(-0.5 * (np.maximum(np.sqrt(r2) - 0.5 * radius, 0.0) / (0.35 * radius)) ** 2)
        img += contrast * profile
        scan = Scan(index, side, level, size, (float(cx), float(cy)), float(radius), float(contrast))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, scan


def question_kind(record_or_id) -> str | None:
    """The kind of a synthetic question (one of :data:`QUESTION_KINDS`) from its record or id, else None."""
    rid = record_or_id if isinstance(record_or_id, str) else getattr(record_or_id, "id", "")
    kind = rid.rsplit("-", 1)[-1] if isinstance(rid, str) else ""
    return kind if kind in QUESTION_KINDS else None


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
    contrast: tuple[float, float] = CONTRAST_RANGE,
) -> Path:
    """Writes ``num_images`` scans, their masks and their question records under ``out_dir``.

    Args:
        out_dir: folder; ``images/``, ``masks/`` and ``<split>.jsonl`` are written inside.
        num_images: scans to draw (each gives 5 question records, 1 when it has no lesion).
        seed: the generator seed; use different seeds for train and held-out splits.
        image_size: side of the square uint8 grayscale images, >= 16.
        lesion_rate: probability that a scan has a lesion, in [0, 1].
        split: name of the split: record ids and the JSONL file name.
        contrast: ``(low, high)`` grey levels a lesion's centre stands above its tissue, drawn uniformly per
            lesion; the default is the faint :data:`CONTRAST_RANGE` (a brighter range makes an easier split, e.g.
            for teaching a base model to look).

    Returns:
        the path of the JSONL file of :class:`QARecord` (paths in it relative to ``out_dir``).
    """
    from PIL import Image

    for name, value, low in (("num_images", num_images, 1), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"make_synthetic_vqa: `{name}` must be an int >= {low}; got {value!r}")
    if not 0.0 <= lesion_rate <= 1.0:
        raise ValueError(f"make_synthetic_vqa: `lesion_rate` must lie in [0, 1]; got {lesion_rate!r}")
    if (not isinstance(contrast, (tuple, list)) or len(contrast) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in contrast)
            or not 0 <= contrast[0] <= contrast[1] <= 255):
        raise ValueError(f"make_synthetic_vqa: `contrast` must be (low, high) with 0 <= low <= high <= 255; got {contrast!r}")
    if not split or not split.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"make_synthetic_vqa: `split` must be a short alphanumeric name; got {split!r}")
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, image_size])
    records: list[QARecord] = []
    for i in range(num_images):
        img, mask, scan = _draw_scan(i, rng, image_size, lesion_rate, tuple(contrast))
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
