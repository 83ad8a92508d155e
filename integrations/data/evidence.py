"""Does a lesion-corrupted image v' still show the lesion? Detectors that learn nothing, read v and v'.

The visual-contrastive term of FiRe-MPO reverses the preference on v', which is only meaningful if v' no
longer shows what the right answer needs. This module measures that on the synthetic set's closed questions
(``side``, ``level``, ``size``, ``presence``; see :mod:`.synthetic`) with two detectors that have no trained
parameter, and compares what they read on v with what they read on v':

* ``matched-filter`` looks for the lesion itself: a bright disc standing above the tissue around it, found by
  a centre-minus-surround filter at several radii inside the lung fields (means taken over lung-field pixels
  only, so the brighter body around a lung is no lesion).
* ``texture-outlier`` looks for where the image was altered: the local energy of the fine texture (the image
  minus its 3x3 median) compared with the same scan's typical energy in its lung fields; a spot that is too
  rough (added noise) or too smooth (a blur, an untextured fill) stands out either way.

Both find the lung fields from the pixels of the scan they read (three grey classes, background, lung and
body, split by a two-threshold Otsu; an ellipse per side from the lung pixels' moments), never from the
generator's constants. From the strongest spot they answer: side from its x against the body's midline (the
patient's left is the image's right), level from its y against the centre of its lung field, size from its
radius, presence from its score. The two thresholds they need come from images, never from labels:

* presence: ``matched-filter`` splits its scores on the clean scans in two groups (Otsu: scans with and
  without a nodule); ``texture-outlier`` takes the highest score any clean scan reaches (nothing in a clean
  scan is altered). Both thresholds are fixed on v and used unchanged on v'.
* size: the two groups of an Otsu split of the detector's log radii over the scans asked about size, each set
  (v or v') on its own: "large" means larger than the others of the set.

:func:`evidence_check` returns an :class:`EvidenceReport`: per question kind and detector the accuracy on v and
on v' with its standard error, and a verdict. Each accuracy is compared with the detector's own baseline, the
accuracy of answers given as often as it gave them but independently of the truth
(``sum_c share(truth = c) share(said = c)``; for a detector that always gives the most frequent answer, the
chance rate). A detector *reads* a set when it beats its baseline by more than two standard errors of it; its
answers *depend on the truth* when they are that far from it either way (below it, they follow the truth
reversed: a fill darker than the tissue puts the brightest spot in the other lung, which tells the side as
well). The corruption *removes* the evidence of a kind when some detector reads v and no detector's answers on
v' depend on the truth; it *leaves* it otherwise (``left``). Comparing with the detector's own baseline rather
than the majority rate keeps a detector whose answers lean one way once the lesion is gone (a presence
detector that says "no lesion" on every v' is right about the image) from counting as evidence.

Command line: ``firempo-corrupt --check --data records.jsonl [--out evidence.json]`` (records with
``corrupted_image``, as ``firempo-corrupt`` writes them). Measured tables: docs/corruption.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ._filters import gaussian_taps
from .editors import find_candidates
from .records import QARecord
from .synthetic import LEVELS, SIDES, SIZES, question_kind

KINDS = ("side", "level", "size", "presence")
"""The question kinds the detectors answer, in report order."""
PRESENCE = ("a lesion", "no lesion")
VERDICTS = ("removed", "left", "unread")
"""``removed``: some detector reads v, no detector's answers on v' depend on the truth. ``left``: some do.
``unread``: no detector reads v, so nothing can be said about v'."""


# ---------------------------------------------------------------------------------------------- image ops


def _as_gray(image: np.ndarray, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(
            f"{what} must be a uint8 numpy array; got {getattr(image, 'dtype', type(image).__name__)}"
        )
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = image[..., :3].mean(axis=2) if image.shape[2] >= 3 else image[..., 0]
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"{what} must be [H, W] or [H, W, C] with H, W >= 8; got shape {image.shape}")
    return image.astype(np.float64)


def _conv(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Same-size 2-D correlation of ``a`` with a centred odd-sized ``kernel``, zeros outside ``a``."""
    h, w = a.shape
    kh, kw = kernel.shape
    shape = (h + kh - 1, w + kw - 1)
    out = np.fft.irfft2(np.fft.rfft2(a, shape) * np.fft.rfft2(kernel[::-1, ::-1], shape), shape)
    return out[kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w]


def _disc(radius: float, outer: float | None = None) -> np.ndarray:
    """Anti-aliased disc of ``radius`` pixels, or the ring between ``radius`` and ``outer``."""
    reach = int(math.ceil(outer if outer is not None else radius)) + 1
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    dist = np.hypot(yy, xx)
    disc = np.clip(radius + 0.5 - dist, 0.0, 1.0)
    if outer is None:
        return disc
    return np.clip(outer + 0.5 - dist, 0.0, 1.0) - disc


def _masked_mean(a: np.ndarray, mask: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel-weighted mean of ``a`` over ``mask`` pixels around every pixel, and the weight it had."""
    weight = _conv(mask.astype(np.float64), kernel)
    total = _conv(np.where(mask, a, 0.0), kernel)
    return total / np.maximum(weight, 1e-9), weight


class _Correlator:
    """Kernel-weighted means of one image over one mask, for many kernels: the image's transforms are taken
    once (the kernels, up to ``reach`` pixels wide, are zero-padded to the same size)."""

    def __init__(self, a: np.ndarray, mask: np.ndarray, reach: int) -> None:
        self.shape = (a.shape[0] + reach, a.shape[1] + reach)
        self.size = a.shape
        self.fa = np.fft.rfft2(np.where(mask, a, 0.0), self.shape)
        self.fm = np.fft.rfft2(mask.astype(np.float64), self.shape)

    def mean(self, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kh, kw = kernel.shape
        fk = np.fft.rfft2(kernel[::-1, ::-1], self.shape)
        h, w = self.size
        both = np.fft.irfft2(np.stack([self.fa * fk, self.fm * fk]), self.shape)[:, kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w]
        return both[0] / np.maximum(both[1], 1e-9), both[1]


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    taps = gaussian_taps(sigma)
    kernel = np.outer(taps, taps)
    return _masked_mean(a, np.ones(a.shape, bool), kernel)[0]


def _median3(a: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(a, 1, mode="edge"), (3, 3))
    return np.median(windows.reshape(*a.shape, 9), axis=-1)


def _box_mean(a: np.ndarray, width: int) -> np.ndarray:
    return _masked_mean(a, np.ones(a.shape, bool), np.ones((width, width)))[0]


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 1, constant_values=False), (3, 3))
        mask = windows.all(axis=(-1, -2))
    return mask


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 1, constant_values=False), (3, 3))
        mask = windows.any(axis=(-1, -2))
    return mask


def _component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 8-connected part of ``mask`` that holds ``seed`` (empty when the seed is outside the mask)."""
    grown = np.zeros_like(mask)
    if not mask[seed]:
        return grown
    grown[seed] = True
    while True:
        nxt = _dilate(grown, 1) & mask
        if nxt.sum() == grown.sum():
            return grown
        grown = nxt


def otsu_split(values: Sequence[float] | np.ndarray) -> float:
    """The threshold that splits ``values`` in two groups with the largest between-group variance (Otsu).

    Returns the midpoint between the two values the best split falls between; nan for fewer than 2
    distinct values.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    if v.size < 2 or v[0] == v[-1]:
        return math.nan
    n = v.size
    k = np.arange(1, n)
    csum = np.cumsum(v)[:-1]
    m0, m1 = csum / k, (v.sum() - csum) / (n - k)
    between = k * (n - k) * (m0 - m1) ** 2
    between[v[1:] == v[:-1]] = -1.0  # a split must fall between different values
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def _otsu3(values: np.ndarray, bins: int = 128) -> tuple[float, float]:
    """Two thresholds splitting ``values`` into three grey classes (background, lung, body)."""
    lo, hi = float(values.min()), float(values.max())
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi + 1e-9))
    centres = (edges[:-1] + edges[1:]) / 2
    p = hist / hist.sum()
    w = np.cumsum(p)
    mu = np.cumsum(p * centres)
    total = mu[-1]
    i, j = np.triu_indices(bins - 1, 1)  # classes [0, i], (i, j], (j, end]
    w0, w1, w2 = w[i], w[j] - w[i], 1 - w[j]
    m0, m1, m2 = mu[i], mu[j] - mu[i], total - mu[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = m0**2 / w0 + m1**2 / w1 + m2**2 / w2
    between[(w0 <= 0) | (w1 <= 0) | (w2 <= 0)] = -np.inf
    best = int(np.argmax(between))
    return float(edges[i[best] + 1]), float(edges[j[best] + 1])


# ------------------------------------------------------------------------------------------------ anatomy


@dataclass(frozen=True)
class LungField:
    """One lung field as an ellipse, in pixels: centre ``(cx, cy)`` and half-axes ``(ax, ay)``."""

    cx: float
    cy: float
    ax: float
    ay: float


@dataclass(frozen=True)
class Anatomy:
    """What a scan's own pixels say about its anatomy.

    ``midline`` is the body's centre x (pixels); ``lungs`` the image-left and image-right lung fields (the
    patient's right and left); ``field`` the bool ``[H, W]`` union of the two ellipses, the search area.
    """

    midline: float
    lungs: tuple[LungField, LungField]
    field: np.ndarray = field(repr=False)
    cuts: tuple[float, float] = (math.nan, math.nan)  #: grey levels between background, lung and body
    smoothing: float = 1.0  #: the Gaussian sigma (pixels) the cuts apply after

    @property
    def inner_field(self) -> np.ndarray:
        """``field`` less its outer pixel: the lung tissue without the partial pixels at the lung's edge."""
        return _erode(self.field, 1)

    @property
    def scale(self) -> float:
        """The mean half-width of the lung fields, in pixels: the unit the detectors size their filters in."""
        return float(max(1.0, (self.lungs[0].ax + self.lungs[1].ax) / 2))


def find_anatomy(image: np.ndarray) -> Anatomy:
    """Finds the body's midline and the two lung fields of a chest scan from its pixels.

    Args:
        image: uint8 ``[H, W]`` or ``[H, W, C]`` (channels averaged), H, W >= 8.

    Grey levels are smoothed (Gaussian, 1/32 of the side), split into background, lung and body by a
    two-threshold Otsu; the lung pixels at least 1/16 of the side inside the tissue (not the rim of the body)
    on each side of the tissue's centroid give an ellipse from their moments (a filled ellipse has half-axes
    twice its standard deviations). A side without lung pixels gets the ellipse of its tissue. The two fields
    are then made mirror images about the midline (the larger half-axes, the mean height of the two).
    """
    g = _as_gray(image, "find_anatomy: `image`")
    h, w = g.shape
    smooth = _gaussian(g, max(0.7, min(h, w) / 32))
    t1, t2 = _otsu3(smooth)
    tissue = smooth > t1
    if not tissue.any():
        tissue = np.ones_like(tissue)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    midline = float(xx[tissue].mean())
    inner = _erode(tissue, max(1, round(min(h, w) / 16)))
    lung = inner & (smooth <= t2)
    fields = []
    for side in (xx < midline, xx >= midline):
        pix = lung & side
        if pix.sum() < 5:
            pix = tissue & side
        if pix.sum() < 2:
            pix = side
        cx, cy = float(xx[pix].mean()), float(yy[pix].mean())
        ax, ay = (max(1.0, 2 * float(v[pix].std())) for v in (xx, yy))
        fields.append(LungField(cx, cy, ax, ay))
    # The two lung fields as mirror images about the midline, each with the larger half-axes and the mean
    # height of the two fits: a lesion pulls in only its own lung's fit (a bright one is a hole in the lung's
    # pixels), and the mirrored fit halves the wrongly classed pixels in an inpainted region (6.8% -> 3.1%).
    left, right = fields
    cy, ax, ay = (left.cy + right.cy) / 2, max(left.ax, right.ax), max(left.ay, right.ay)
    half = (right.cx - left.cx) / 2
    fields = [LungField(midline - half, cy, ax, ay), LungField(midline + half, cy, ax, ay)]
    mask = np.zeros((h, w), bool)
    for f in fields:
        mask |= ((xx - f.cx) / (f.ax + 0.5)) ** 2 + ((yy - f.cy) / (f.ay + 0.5)) ** 2 <= 1
    return Anatomy(midline, (fields[0], fields[1]), mask, (t1, t2), max(0.7, min(h, w) / 32))


# ---------------------------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class Finding:
    """A detector's strongest spot in one image: how much it stands out (``score``, unitless), where
    (``x``, ``y``, pixels) and how large (``radius``, pixels)."""

    score: float
    x: float
    y: float
    radius: float


class Detector(Protocol):
    """A detector that learns nothing: ``find(image, anatomy) -> Finding`` and a presence threshold set from
    the scores of clean scans."""

    name: str

    def find(self, image: np.ndarray, anatomy: Anatomy) -> Finding: ...

    def presence_threshold(self, clean_scores: Sequence[float]) -> float: ...


class MatchedFilterDetector:
    """Looks for a bright disc: the mean over a disc minus the mean over the ring around it (1.3 to 2 radii),
    both over lung-field pixels only, at radii of 0.3 to 1 lung half-width; each radius's response divided by
    its spread over the field (1.4826 median absolute deviation). The score is the largest such z over the
    field; the radius is interpolated between the two best radii (parabola in log radius)."""

    name = "matched-filter"
    RADII = (0.3, 0.4, 0.52, 0.68, 0.88)  #: filter radii in lung half-widths

    def find(self, image: np.ndarray, anatomy: Anatomy) -> Finding:
        """The strongest spot of a uint8 ``[H, W]`` or ``[H, W, C]`` scan inside ``anatomy``'s lung fields."""
        g = _as_gray(image, f"{self.name}: `image`")
        fld = anatomy.inner_field
        radii = [max(0.8, rel * anatomy.scale) for rel in self.RADII]
        discs = [_disc(r) for r in radii]
        rings = [_disc(1.3 * r, max(2 * r, 1.3 * r + 1.5)) for r in radii]
        corr = _Correlator(g, fld, max(k.shape[0] for k in rings))
        zs, kept = [], []
        for r, disc, ring_kernel in zip(radii, discs, rings):
            centre, inside = corr.mean(disc)
            ring, weight = corr.mean(ring_kernel)
            response = centre - ring
            valid = fld & (inside >= 0.7 * disc.sum()) & (weight >= 0.35 * ring_kernel.sum())
            if valid.sum() < 8:
                continue
            vals = response[valid]
            spread = 1.4826 * float(np.median(np.abs(vals - np.median(vals)))) or float(vals.std()) or 1.0
            zs.append(np.where(valid, (response - np.median(vals)) / spread, -np.inf))
            kept.append(r)
        if not zs:
            return Finding(0.0, anatomy.midline, g.shape[0] / 2, 0.0)
        stack = np.stack(zs)
        k, y, x = np.unravel_index(int(np.argmax(stack)), stack.shape)
        radius = kept[k]
        if 0 < k < len(kept) - 1:
            a, b, c = stack[k - 1, y, x], stack[k, y, x], stack[k + 1, y, x]
            curve = a - 2 * b + c
            if np.isfinite(curve) and curve < 0:
                shift = float(np.clip(0.5 * (a - c) / curve, -0.5, 0.5))
                lo, hi = math.log(kept[k - 1]), math.log(kept[k + 1])
                radius = math.exp(math.log(radius) + shift * (hi - lo) / 2)
        return Finding(float(stack[k, y, x]), x + 0.5, y + 0.5, float(radius))

    def presence_threshold(self, clean_scores: Sequence[float]) -> float:
        """The Otsu split of the clean scans' scores (float): scans with a nodule and scans without."""
        return otsu_split(clean_scores)


class TextureOutlierDetector:
    """Looks for where the image was altered: the fine texture ``image - median3(image)``, its local energy
    (mean square over a window of half a lung half-width, at least 3 pixels), compared with the scan's median
    energy over its lung fields as ``|log((e + 0.5) / (e_ref + 0.5))|`` (0.5: the rounding floor of 8-bit
    pixels). Too rough and too smooth both stand out. The score is the largest value over the field; the
    radius that of the 8-connected patch around it standing out by at least half as much, on the same side
    (rougher or smoother)."""

    name = "texture-outlier"

    def find(self, image: np.ndarray, anatomy: Anatomy) -> Finding:
        """The strongest spot of a uint8 ``[H, W]`` or ``[H, W, C]`` scan inside ``anatomy``'s lung fields."""
        g = _as_gray(image, f"{self.name}: `image`")
        fld = _dilate(anatomy.field, 1)
        resid = g - _median3(g)
        width = max(3, 2 * round(0.25 * anatomy.scale) + 1)
        energy = _box_mean(resid**2, width)
        ref = float(np.median(energy[fld])) if fld.any() else float(np.median(energy))
        standout = np.log((energy + 0.5) / (ref + 0.5))
        strength = np.where(fld, np.abs(standout), -np.inf)
        y, x = np.unravel_index(int(np.argmax(strength)), strength.shape)
        peak = float(standout[y, x])
        patch = _component(fld & (np.sign(standout) == np.sign(peak)) & (np.abs(standout) >= abs(peak) / 2), (y, x))
        return Finding(abs(peak), x + 0.5, y + 0.5, math.sqrt(max(int(patch.sum()), 1) / math.pi))

    def presence_threshold(self, clean_scores: Sequence[float]) -> float:
        """The highest score of any clean scan (float; nan without scores): nothing in a clean scan is altered."""
        scores = np.asarray(clean_scores, dtype=np.float64)
        return float(scores.max()) if scores.size else math.nan


DEFAULT_DETECTORS: tuple[Detector, ...] = (MatchedFilterDetector(), TextureOutlierDetector())


@dataclass(frozen=True)
class Reading:
    """One detector's reading of one image: what it found and the scan's anatomy."""

    finding: Finding
    anatomy: Anatomy


def read_image(image: np.ndarray, detector: Detector) -> Reading:
    """Runs ``detector`` on a uint8 ``[H, W]`` or ``[H, W, C]`` image, anatomy found from the same pixels."""
    anatomy = find_anatomy(image)
    return Reading(detector.find(image, anatomy), anatomy)


def answer(reading: Reading, kind: str, *, presence_threshold: float, size_threshold: float) -> str:
    """The candidate a reading names for a question ``kind`` (one of :data:`KINDS`).

    side: ``left`` when the spot lies right of the midline (the patient's left is the image's right);
    level: ``upper`` when it lies above the centre of the lung field on its side; size: ``large`` when its
    radius exceeds ``size_threshold`` (pixels); presence: ``a lesion`` when its score exceeds
    ``presence_threshold``.
    """
    f, a = reading.finding, reading.anatomy
    if kind == "side":
        return SIDES[0] if f.x > a.midline else SIDES[1]
    if kind == "level":
        lung = a.lungs[1] if f.x > a.midline else a.lungs[0]
        return LEVELS[0] if f.y < lung.cy else LEVELS[1]
    if kind == "size":
        return SIZES[1] if f.radius > size_threshold else SIZES[0]
    if kind == "presence":
        return PRESENCE[0] if f.score > presence_threshold else PRESENCE[1]
    raise ValueError(f"answer: `kind` must be one of {KINDS}; got {kind!r}")


# ------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Accuracy:
    """``correct`` right answers out of ``n``; ``accuracy`` and its standard error ``sqrt(p (1 - p) / n)``.

    ``baseline`` is the accuracy a detector would have that gives each answer as often as this one did but
    independently of the truth, ``sum over answers c of share(truth = c) * share(said = c)``;
    ``baseline_se = sqrt(baseline (1 - baseline) / n)``. A detector that always says "left" has the share of
    "left" as its baseline, whatever the majority is.
    """

    correct: int
    n: int
    baseline: float = math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan

    @property
    def se(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n) if self.n else math.nan

    @property
    def baseline_se(self) -> float:
        b = self.baseline
        return math.sqrt(b * (1 - b) / self.n) if self.n else math.nan

    @property
    def reads(self) -> bool:
        """Above its baseline by more than two standard errors: the answers follow the truth."""
        return bool(self.n) and self.accuracy > self.baseline + 2 * self.baseline_se

    @property
    def informed(self) -> bool:
        """More than two standard errors from its baseline either way: the answers depend on the truth (below
        the baseline they follow it reversed, which tells as much)."""
        return bool(self.n) and abs(self.accuracy - self.baseline) > 2 * self.baseline_se


@dataclass(frozen=True)
class KindEvidence:
    """One question kind: the records' chance rate and every detector's accuracy on v and on v'.

    ``chance`` is the share of the most frequent right answer (a blind guess of it scores that),
    ``chance_se = sqrt(chance (1 - chance) / n)``. The verdict is taken against each detector's own baseline
    (:class:`Accuracy`), which equals ``chance`` for a detector that always gives the most frequent answer.
    """

    kind: str
    n: int
    chance: float
    clean: dict[str, Accuracy]
    corrupted: dict[str, Accuracy]

    @property
    def chance_se(self) -> float:
        return math.sqrt(self.chance * (1 - self.chance) / self.n) if self.n else math.nan

    @property
    def verdict(self) -> str:
        """``removed``, ``left`` or ``unread`` (see :data:`VERDICTS`)."""
        if any(a.informed for a in self.corrupted.values()):
            return "left"
        if any(a.reads for a in self.clean.values()):
            return "removed"
        return "unread"


@dataclass(frozen=True)
class EvidenceReport:
    """What :func:`evidence_check` measured: per question kind, per detector, accuracy on v and v'.

    ``kinds`` maps each kind present (in :data:`KINDS` order) to its :class:`KindEvidence`; ``thresholds``
    maps each detector to the presence threshold it set on v and the size thresholds it set on v and on v';
    ``skipped`` counts the records that could not be judged (no kind the detectors answer, no single right
    candidate, or no ``corrupted_image``). ``label`` names the corruption in the markdown table.
    """

    kinds: dict[str, KindEvidence]
    detectors: tuple[str, ...]
    thresholds: dict[str, dict[str, float]]
    skipped: int = 0
    label: str = "v'"

    @property
    def removes(self) -> bool:
        """True when every kind the detectors read on v is ``removed`` (and at least one is)."""
        verdicts = [k.verdict for k in self.kinds.values()]
        return "removed" in verdicts and "left" not in verdicts

    def verdicts(self) -> dict[str, str]:
        """Question kind -> ``removed`` | ``left`` | ``unread``."""
        return {k: e.verdict for k, e in self.kinds.items()}

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data; nan written as None."""

        def num(x: float) -> float | None:
            return None if isinstance(x, float) and math.isnan(x) else x

        def acc(a: Accuracy) -> dict[str, Any]:
            return {"correct": a.correct, "n": a.n, "accuracy": num(a.accuracy), "se": num(a.se),
                    "baseline": num(a.baseline), "baseline_se": num(a.baseline_se), "informed": a.informed}

        return {
            "label": self.label,
            "removes": self.removes,
            "skipped": self.skipped,
            "detectors": list(self.detectors),
            "thresholds": {d: {k: num(v) for k, v in t.items()} for d, t in self.thresholds.items()},
            "kinds": {
                kind: {
                    "n": e.n, "chance": num(e.chance), "chance_se": num(e.chance_se), "verdict": e.verdict,
                    "clean": {d: acc(a) for d, a in e.clean.items()},
                    "corrupted": {d: acc(a) for d, a in e.corrupted.items()},
                }
                for kind, e in self.kinds.items()
            },
        }

    def markdown(self) -> str:
        """A markdown table: one row per kind, accuracy +- standard error per detector on v and on v'."""

        def cell(a: Accuracy, e: KindEvidence) -> str:
            mark = "**" if a.informed else ""
            return f"{mark}{100 * a.accuracy:.0f}{mark} +- {100 * a.se:.0f} ({100 * a.baseline:.0f})"

        head = ["question", "n", "chance"]
        for d in self.detectors:
            head += [f"{d} on v", f"{d} on {self.label}"]
        head.append(f"evidence on {self.label}")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for kind, e in self.kinds.items():
            row = [kind, str(e.n), f"{100 * e.chance:.0f}"]
            for d in self.detectors:
                row += [cell(e.clean[d], e), cell(e.corrupted[d], e)]
            row.append(e.verdict)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append(
            "Accuracy in % +- its standard error (in brackets the detector's baseline: the accuracy of its own "
            "answers given independently of the truth); **bold**: more than two standard errors of that baseline "
            "from it. Chance: the share of the most frequent right answer. `removed`: a detector reads v, none "
            f"is bold on {self.label}; `left`: a detector is bold on {self.label} (above or below its baseline: "
            "either way its answers depend on the truth); `unread`: no detector reads v."
        )
        return "\n".join(lines)


def _accuracy(said: Sequence[str], truth: Sequence[str]) -> Accuracy:
    n = len(truth)
    baseline = sum(truth.count(c) * said.count(c) for c in set(truth)) / (n * n)
    return Accuracy(sum(a == b for a, b in zip(said, truth)), n, baseline)


def _right_candidate(record: QARecord) -> str | None:
    if not record.candidates or record.ground_truth is None:
        return None
    said = find_candidates(record.candidates, record.ground_truth)
    return next(iter(said)) if len(said) == 1 else None


def _load(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def evidence_check(
    records: Sequence[QARecord],
    *,
    detectors: Sequence[Detector] = DEFAULT_DETECTORS,
    label: str = "v'",
    load: Callable[[str], np.ndarray] = _load,
) -> EvidenceReport:
    """Runs every detector on every record's clean image v and its corrupted image v', per question kind.

    Args:
        records: :class:`~.records.QARecord` (or preference records) of the synthetic set: the kind is the
            suffix of the id (``synth-<split>-<i>-<kind>``), the right answer the candidate the ground truth
            names; only records with ``corrupted_image`` and a kind of :data:`KINDS` are judged.
        detectors: objects with ``name``, ``find`` and ``presence_threshold`` (see :class:`Detector`).
        label: what the markdown table calls v' (e.g. ``"v' (inpaint)"``).
        load: reads an image path as uint8 ``[H, W]`` (default: PIL, converted to grey).

    Returns:
        an :class:`EvidenceReport`. Each image is read once per detector however many records share it.

    Raises:
        TypeError: ``records`` is not a sequence of QARecord, or a detector lacks the interface.
        ValueError: no record can be judged, or two detectors share a name.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"evidence_check: `records` must be a sequence of QARecord; got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, QARecord):
            raise TypeError(f"evidence_check: `records[{i}]` must be a QARecord; got {type(rec).__name__}")
    detectors = tuple(detectors)
    for i, det in enumerate(detectors):
        if not all(callable(getattr(det, m, None)) for m in ("find", "presence_threshold")) or not isinstance(
            getattr(det, "name", None), str
        ):
            raise TypeError(
                f"evidence_check: `detectors[{i}]` must have a str `name`, `find` and `presence_threshold`; got "
                f"{type(det).__name__}"
            )
    names = [d.name for d in detectors]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"evidence_check: `detectors` must be non-empty with distinct names; got {names}")

    judged: list[tuple[QARecord, str, str]] = []
    for rec in records:
        kind, right = question_kind(rec), _right_candidate(rec)
        if kind in KINDS and right is not None and rec.corrupted_image is not None:
            judged.append((rec, kind, right))
    if not judged:
        raise ValueError(
            f"evidence_check: none of the {len(records)} records can be judged: each needs a synthetic question id "
            f"ending in one of {KINDS}, a ground truth naming one of its candidates, and a `corrupted_image`"
        )

    images: dict[str, np.ndarray] = {}

    def image(path: str) -> np.ndarray:
        if path not in images:
            images[path] = load(path)
        return images[path]

    clean_paths = sorted({rec.image for rec, _, _ in judged})
    bad_paths = sorted({rec.corrupted_image for rec, _, _ in judged})  # type: ignore[type-var]
    anatomy = {p: find_anatomy(image(p)) for p in clean_paths + bad_paths}
    thresholds: dict[str, dict[str, float]] = {}
    answers: dict[str, dict[str, dict[str, str]]] = {}
    for det in detectors:
        found = {p: Reading(det.find(image(p), anatomy[p]), anatomy[p]) for p in clean_paths + bad_paths}
        presence = det.presence_threshold([found[p].finding.score for p in clean_paths])
        # A size question presupposes a lesion: the split is over the scans asked about size, so that the
        # scans without one (and, on v', their whole-image noise) do not pull it.
        sized = [(rec.image, rec.corrupted_image) for rec, kind, _ in judged if kind == "size"] or [
            (rec.image, rec.corrupted_image) for rec, _, _ in judged
        ]
        sizes = {
            which: otsu_split([math.log(max(found[pair[i]].finding.radius, 1e-3)) for pair in sized])
            for i, which in enumerate(("clean", "corrupted"))
        }
        thresholds[det.name] = {
            "presence": presence,
            "size_clean": math.exp(sizes["clean"]) if np.isfinite(sizes["clean"]) else math.nan,
            "size_corrupted": math.exp(sizes["corrupted"]) if np.isfinite(sizes["corrupted"]) else math.nan,
        }
        answers[det.name] = {
            which: {
                p: {
                    kind: answer(found[p], kind, presence_threshold=presence,
                                 size_threshold=thresholds[det.name][f"size_{which}"])
                    for kind in KINDS
                }
                for p in paths
            }
            for which, paths in (("clean", clean_paths), ("corrupted", bad_paths))
        }

    kinds: dict[str, KindEvidence] = {}
    for kind in KINDS:
        rows = [(rec, right) for rec, k, right in judged if k == kind]
        if not rows:
            continue
        counts: dict[str, int] = {}
        for _, right in rows:
            counts[right] = counts.get(right, 0) + 1
        chance = max(counts.values()) / len(rows)
        clean, corrupted = {}, {}
        for det in detectors:
            for which, into, path in (("clean", clean, "image"), ("corrupted", corrupted, "corrupted_image")):
                said = [answers[det.name][which][getattr(r, path)][kind] for r, _ in rows]
                into[det.name] = _accuracy(said, [right for _, right in rows])
        kinds[kind] = KindEvidence(kind, len(rows), chance, clean, corrupted)
    return EvidenceReport(kinds, tuple(names), thresholds, skipped=len(records) - len(judged), label=label)
