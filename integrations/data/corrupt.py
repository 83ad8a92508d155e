"""Lesion corruption: the image v' of FiRe-MPO's visual-contrastive term, seeded per record.

Three modes (``mode=``), each applied to the lesion region dilated by ``margin`` pixels:

* ``paper`` (default): the paper's v'. Zero-mean Gaussian noise with sigma = 45 (on the 0-255 scale) is added
  independently to every channel of every pixel inside the lesion region, then the result is rounded and
  clipped to [0, 255]. It keeps the lesion's mean brightness, and the noise marks where the lesion is
  (docs/corruption.md measures both). Margin 0 unless given, so the default output is the paper's.
* ``inpaint``: the region is filled from the tissue around it, with texture matched to that tissue, so that
  neither the lesion nor the fill stands out. Every pixel gets a tissue class from the scan's own pixels
  (background, lung, body: :func:`.evidence.find_anatomy`'s grey-level cuts outside the region, its lung-field
  ellipses inside, so a lung narrower than the region runs through it); each class present in the region is
  filled by OpenCV's Telea inpainting from the pixels of that class in the ring around the region (not those
  at a tissue boundary, which mix two levels), plus a white and a smooth Gaussian field whose amplitudes give
  the fill the fine energy (the image minus its 3x3 median) and the local energy (around a local mean) of
  the ring's tissue. Default margin 2.
* ``blur``: the region replaced by a strong Gaussian blur of the image (sigma = the region's equivalent radius
  unless ``blur_sigma`` is given). Default margin 2.

A record with no region (no mask, no box) gets sigma = 12 noise on the whole image in every mode, as in the
paper. The generator is seeded from the record id alone (SHA-256, not Python's salted ``hash``), so the same
record gets the same v' on every machine and every run. Corrupted images are written as PNG: a lossy format
would alter the pixels outside the lesion as well.

Command line: ``firempo-corrupt --data records.jsonl --out records.corrupted.jsonl --image-dir corrupted/
[--mode inpaint] [--margin 2]``; ``firempo-corrupt --check --data records.corrupted.jsonl`` measures whether
v' still shows the lesion (:mod:`.evidence`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cli import atomic_write, check_writable_dir, check_writable_file, run_command
from ._filters import gaussian_taps
from ._progress import progress
from .records import QARecord, load_preference_records, load_qa_records, read_jsonl, write_records

SIGMA_LESION = 45.0
SIGMA_WHOLE_IMAGE = 12.0
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


def record_seed(record_id: str) -> int:
    """The noise seed of a record: the first 8 bytes of SHA-256 of its id, as an unsigned integer."""
    if not isinstance(record_id, str) or not record_id:
        raise TypeError(f"record_seed: `record_id` must be a non-empty str; got {record_id!r}")
    return int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "little")


MODES = ("paper", "inpaint", "blur")
"""The corruption modes; ``paper`` is the paper's and the default."""
DEFAULT_MARGIN = {"paper": 0, "inpaint": 2, "blur": 2}
"""Pixels the lesion region is dilated by in each mode when ``margin`` is None. A soft-edged lesion reaches
past its mask: 2 pixels take its shoulder into the region (docs/corruption.md)."""


def _check_mode_margin(where: str, mode: str, margin: int | None) -> int:
    if mode not in MODES:
        raise ValueError(f"{where}: `mode` must be one of {MODES}; got {mode!r}")
    if margin is None:
        return DEFAULT_MARGIN[mode]
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"{where}: `margin` must be an int >= 0 (pixels) or None; got {margin!r}")
    return int(margin)


def dilate(region: np.ndarray, margin: int) -> np.ndarray:
    """``region`` (bool ``[H, W]``) grown by every pixel within ``margin`` pixels (Euclidean) of it."""
    if margin <= 0 or not region.any():
        return region
    ys, xs = np.nonzero(region)
    y0, y1 = max(0, ys.min() - margin), min(region.shape[0], ys.max() + margin + 1)
    x0, x1 = max(0, xs.min() - margin), min(region.shape[1], xs.max() + margin + 1)
    core = np.pad(region[y0:y1, x0:x1], margin)
    out = np.zeros_like(region)
    grown = np.zeros((y1 - y0, x1 - x0), bool)
    h, w = grown.shape
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            if dy * dy + dx * dx <= margin * margin:
                grown |= core[margin + dy : margin + dy + h, margin + dx : margin + dx + w]
    out[y0:y1, x0:x1] = grown
    return out


def corrupt_array(
    image: np.ndarray,
    region: np.ndarray | None,
    seed: int,
    *,
    mode: str = "paper",
    margin: int | None = None,
    sigma_lesion: float = SIGMA_LESION,
    sigma_whole_image: float = SIGMA_WHOLE_IMAGE,
    blur_sigma: float | None = None,
) -> np.ndarray:
    """Corrupts the lesion of one image (see the module's notes for the modes).

    Args:
        image: uint8 ``[H, W]`` (grayscale) or ``[H, W, C]`` (any number of channels, all corrupted).
        region: bool ``[H, W]``, True on the lesion, or None for whole-image noise at ``sigma_whole_image``.
            An all-False region is treated as None (the lesion was not found).
        seed: the generator seed (see :func:`record_seed`).
        mode: ``"paper"`` (default), ``"inpaint"`` or ``"blur"``.
        margin: pixels to dilate ``region`` by; None takes :data:`DEFAULT_MARGIN` of the mode.
        sigma_lesion: the paper mode's noise inside the region (0-255 scale).
        sigma_whole_image: the noise on the whole image when there is no region (every mode).
        blur_sigma: the blur mode's Gaussian sigma in pixels; None takes the dilated region's equivalent
            radius ``sqrt(area / pi)``.

    Returns:
        uint8 array of the shape of ``image``; pixels outside the dilated region are unchanged.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(
            f"corrupt_array: `image` must be a uint8 numpy array; got "
            f"{getattr(image, 'dtype', type(image).__name__)}"
        )
    if image.ndim not in (2, 3):
        raise ValueError(f"corrupt_array: `image` must be [H, W] or [H, W, C]; got shape {image.shape}")
    margin = _check_mode_margin("corrupt_array", mode, margin)
    for name, s in (("sigma_lesion", sigma_lesion), ("sigma_whole_image", sigma_whole_image)):
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"corrupt_array: `{name}` must be finite and >= 0; got {s}")
    if blur_sigma is not None and not (np.isfinite(blur_sigma) and blur_sigma > 0):
        raise ValueError(f"corrupt_array: `blur_sigma` must be finite and > 0, or None; got {blur_sigma}")
    if region is not None:
        if not isinstance(region, np.ndarray) or region.shape != image.shape[:2]:
            raise ValueError(
                f"corrupt_array: `region` must be a bool array of shape {image.shape[:2]}; "
                f"got {getattr(region, 'shape', type(region).__name__)}"
            )
        region = dilate(region.astype(bool), margin)
        if not region.any():
            region = None
    rng = np.random.default_rng(seed)
    if region is None or mode == "paper":
        sigma = sigma_whole_image if region is None else sigma_lesion
        noisy = np.clip(np.rint(image.astype(np.float64) + rng.normal(0.0, sigma, size=image.shape)), 0, 255)
        noisy = noisy.astype(np.uint8)
        if region is None:
            return noisy
    elif mode == "blur":
        radius = float(np.sqrt(region.sum() / np.pi))
        noisy = _blur(image, blur_sigma if blur_sigma is not None else max(1.0, radius))
    else:
        noisy = _inpaint(image, region, rng)
    out = image.copy()
    out[region] = noisy[region]
    return out


def _smooth(a: np.ndarray, sigma: float, weight: np.ndarray | None = None) -> np.ndarray:
    """Gaussian mean of ``a`` (float ``[H, W]``) over the pixels where ``weight`` is 1 (all when None): the
    weights are blurred alike and divided out, so the image's edge and the excluded pixels pull nothing."""
    import cv2

    w = np.ones(a.shape) if weight is None else weight.astype(np.float64)
    taps = gaussian_taps(sigma)
    num = cv2.sepFilter2D(a * w, cv2.CV_64F, taps, taps, borderType=cv2.BORDER_CONSTANT)
    den = cv2.sepFilter2D(w, cv2.CV_64F, taps, taps, borderType=cv2.BORDER_CONSTANT)
    return num / np.maximum(den, 1e-9)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([_smooth(planes[..., c].astype(np.float64), sigma) for c in range(planes.shape[-1])], -1)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[..., 0] if image.ndim == 2 else out


def _fine(a: np.ndarray) -> np.ndarray:
    """The finest texture of a float image: the image minus its 3x3 median."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(a, 1, mode="edge"), (3, 3))
    return a - np.median(windows.reshape(*a.shape, 9), axis=-1)


def _texture(gray: np.ndarray, pixels: np.ndarray, scale: float) -> tuple[float, float]:
    """Two texture energies of the ``pixels`` (bool ``[H, W]``) of a float image: the mean square of the
    finest texture (:func:`_fine`) and of the image around its local Gaussian mean (over the same pixels,
    sigma ``scale``); both as medians of squares / 0.455 (the median of a chi-square with one degree of
    freedom), so that a few pixels of the neighbouring tissue among them do not count as texture."""
    if pixels.sum() < 2:
        return 0.0, 0.0
    fine = _fine(gray)[pixels]
    coarse = (gray - _smooth(gray, scale, pixels))[pixels]
    return float(np.mean(fine**2)), float(np.mean(coarse**2))


def _texture_fields(rng: np.random.Generator, shape: tuple[int, int], width: float) -> tuple[np.ndarray, np.ndarray]:
    """A white and a smooth (white blurred by a Gaussian of sigma ``width``) unit-variance Gaussian field."""
    import cv2

    white = rng.normal(0.0, 1.0, size=shape)
    taps = gaussian_taps(width)
    smooth = cv2.sepFilter2D(rng.normal(0.0, 1.0, size=shape), cv2.CV_64F, taps, taps, borderType=cv2.BORDER_REFLECT)
    return white, smooth / max(float(smooth.std()), 1e-9)


def _matched_texture(
    target_energy: tuple[float, float], fill_energy: tuple[float, float], fields: tuple[np.ndarray, np.ndarray],
    pixels: np.ndarray, scale: float,
) -> np.ndarray:
    """``a * white + b * smooth`` with ``a, b >= 0`` such that the fill plus it has the fine and the local
    energies (:func:`_texture`) of the tissue it replaces: energies of independent fields add, so the two
    amplitudes solve a 2x2 linear system in ``a^2`` and ``b^2`` (each field's energies measured as drawn)."""
    white, smooth = fields
    ew, es = _texture(white, pixels, scale), _texture(smooth, pixels, scale)
    need = np.maximum(np.subtract(target_energy, fill_energy), 0.0)
    m = np.array([[ew[0], es[0]], [ew[1], es[1]]])
    try:
        sq = np.linalg.solve(m, need)
    except np.linalg.LinAlgError:
        sq = np.array([need[0] / max(ew[0], 1e-9), 0.0])
    if (sq < 0).any():  # the tissue is finer or coarser than either field alone: the one that fits best
        fits = [np.array([need[0] / max(ew[0], 1e-9), 0.0]), np.array([0.0, need[1] / max(es[1], 1e-9)])]
        sq = min(fits, key=lambda f: float(((m @ f - need) ** 2).sum()))
    a, b = np.sqrt(np.maximum(sq, 0.0))
    return a * white + b * smooth


def _fill(plane: np.ndarray, unknown: np.ndarray, radius: float) -> np.ndarray:
    """A smooth fill of the ``unknown`` pixels (uint8 ``[H, W]``, 1 = unknown) of a uint8 plane from the known
    ones: OpenCV's Telea inpainting, each pixel from the known pixels within ``max(3, radius / 2)``."""
    import cv2

    return cv2.inpaint(plane, unknown, max(3.0, radius / 2), cv2.INPAINT_TELEA).astype(np.float64)


def _tissue(gray: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Tissue class of every pixel of a chest scan (float ``[H, W]``), from its own pixels: 0 background,
    1 lung, 2 body. Outside ``region`` by grey level (the scan's two Otsu cuts, after a Gaussian mean over
    non-region pixels, so the lesion's brightness leaks into nothing); inside, lung where the scan's lung-field
    ellipses lie (:func:`.evidence.find_anatomy`), body elsewhere: a lesion wider than its lung is filled
    with lung where the lung runs and body where the body does."""
    from .evidence import find_anatomy

    anatomy = find_anatomy(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    smooth = _smooth(gray, anatomy.smoothing, ~region)
    classes = np.digitize(smooth, anatomy.cuts).astype(np.int64)
    return np.where(region, np.where(anatomy.field, 1, 2), classes)


def _inpaint(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The inpaint mode's image (only its ``region`` pixels are used): see the module's notes."""
    planes = image[..., None] if image.ndim == 2 else image
    gray = planes.astype(np.float64).mean(axis=-1)
    radius = float(np.sqrt(region.sum() / np.pi))
    width = max(3, int(round(radius)))  # the ring the fill learns the tissue from
    ring = dilate(region, width) & ~region
    reach = int(round(max(3 * radius, 8)))  # the context the tissue boundary is continued from
    ys, xs = np.nonzero(region)
    y0, y1 = max(0, ys.min() - reach), min(gray.shape[0], ys.max() + 1 + reach)
    x0, x1 = max(0, xs.min() - reach), min(gray.shape[1], xs.max() + 1 + reach)
    win = (slice(y0, y1), slice(x0, x1))
    g, reg, rng_ring = gray[win], region[win], ring[win]
    classes = _tissue(gray, region)[win]
    out = planes.copy()
    nch = planes.shape[-1]
    scale = max(1.0, radius / 2)
    present = [int(c) for c in np.unique(classes[reg])]
    smooth = {}  # (class, channel) -> that class's fill over the window
    texture = {}
    want = {}
    for c in present:
        # Not the pixels at a tissue boundary: they mix the two levels, and a fill read from them is too bright
        # in the darker tissue (a lesion's mark in its own right).
        core = ~dilate(classes != c, 1)
        source = rng_ring & core
        if source.sum() < 4:
            source = rng_ring & (classes == c)
        if source.sum() < 4:  # the class is not in the ring: learn it from the window
            source = ~reg & (classes == c)
        if source.sum() < 4:
            source = rng_ring
        target = reg & (classes == c)
        # One pair of fields for all channels: a grey scan stored as RGB stays grey.
        fields = _texture_fields(rng, g.shape, scale / 2)
        unknown = (~source).astype(np.uint8)
        for ch in range(nch):
            plane = np.ascontiguousarray(planes[win + (ch,)])
            smooth[c, ch] = _fill(plane, unknown, radius)
            want[c, ch] = _texture(plane.astype(np.float64), source, scale)
            # The fill's slow variation across the region is tissue level, not texture: only its fine energy
            # counts against the ring's (counting the rest left the fill less blotchy than its lung, and the
            # matched filter found the other lung's spots brighter: 40% on the side question).
            own = (_texture(smooth[c, ch], target, scale)[0], 0.0)
            texture[c, ch] = _matched_texture(want[c, ch], own, fields, target, scale)
    # Each class takes its own fill: a fill read across the boundary would shift both tissues' levels there.
    base = np.zeros(g.shape + (nch,))
    for c in present:
        for ch in range(nch):
            base[classes == c, ch] = smooth[c, ch][classes == c]
    filled = base.copy()
    for c in present:
        target = reg & (classes == c)
        for ch in range(nch):
            filled[target, ch] += texture[c, ch][target]
    # The fine energies of the fill and of the fields do not quite add up where they meet (the 3x3 median
    # sees both): measure the composed patch once and rescale each class's texture to the ring's fine energy.
    for c in present:
        target = reg & (classes == c)
        inner = target & ~dilate(~target, 1)
        inner = inner if inner.sum() >= 4 else target
        for ch in range(nch):
            plane = planes[win + (ch,)].astype(np.float64)
            fine_now = float(np.mean(_fine(np.where(reg, filled[..., ch], plane))[inner] ** 2))
            fine_fill = float(np.mean(_fine(np.where(reg, base[..., ch], plane))[inner] ** 2))
            if fine_now > fine_fill:
                gain = np.sqrt(max(want[c, ch][0] - fine_fill, 0.0) / (fine_now - fine_fill))
                filled[target, ch] = base[target, ch] + min(gain, 4.0) * texture[c, ch][target]
    out[win][reg] = np.clip(np.rint(filled[reg]), 0, 255).astype(np.uint8)
    return out[..., 0] if image.ndim == 2 else out


def lesion_region(record: QARecord, size: tuple[int, int]) -> np.ndarray | None:
    """The bool ``[H, W]`` lesion region of ``record`` for an image of ``size = (W, H)``.

    The mask image wins over the box when both are given (non-zero pixels = lesion, any mode); the box
    ``[x_min, y_min, x_max, y_max]`` covers the pixels whose centres lie inside it. None without either.
    """
    from PIL import Image

    w, h = size
    if record.lesion_mask is not None:
        with Image.open(record.lesion_mask) as m:
            if m.size != (w, h):
                raise ValueError(
                    f"record {record.id!r}: `lesion_mask` is {m.size[0]}x{m.size[1]} but the image is {w}x{h}"
                )
            arr = np.asarray(m.convert("L"))
        return arr > 0
    if record.lesion_bbox is not None:
        x0, y0, x1, y1 = record.lesion_bbox
        xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
        return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return None


def corrupt_image_file(
    record: QARecord,
    out_path: str | os.PathLike,
    *,
    mode: str = "paper",
    margin: int | None = None,
    **options: float,
) -> str:
    """Writes the corrupted image of ``record`` to ``out_path`` (PNG) and returns the path.

    ``mode``, ``margin`` and ``options`` (``sigma_lesion``, ``sigma_whole_image``, ``blur_sigma``) are
    :func:`corrupt_array`'s. Image modes L and RGB are corrupted as they are; LA and RGBA keep their alpha;
    palette and 1-bit images are expanded to RGB and L first. 16-bit and float images are refused: the noise
    is on the 0-255 scale.
    """
    from PIL import Image

    with Image.open(record.image) as im:
        im.load()
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(
            f"record {record.id!r}: image mode {im.mode!r} is not supported (8-bit L, LA, RGB, RGBA, P, 1); "
            f"convert it to 8 bits first"
        )
    arr = np.asarray(im)
    alpha = None
    if im.mode in ("LA", "RGBA"):
        arr, alpha = arr[..., :-1], arr[..., -1:]
        if im.mode == "LA":
            arr = arr[..., 0]
    region = lesion_region(record, im.size)
    out = corrupt_array(
        np.ascontiguousarray(arr), region, record_seed(record.id), mode=mode, margin=margin, **options
    )
    if alpha is not None:
        out = np.concatenate([out if out.ndim == 3 else out[..., None], alpha], axis=-1)
    with atomic_write(out_path, "wb") as f:
        Image.fromarray(out, mode=None).save(f, format="PNG")
    return str(out_path)


def corrupted_name(record_id: str, mode: str = "paper", margin: int | None = None) -> str:
    """A file name for the corrupted image of a record: its id made path-safe, plus a short hash; a mode or
    margin other than the paper's default is named too, so that images of several modes can share a folder
    without one run overwriting another's."""
    margin = _check_mode_margin("corrupted_name", mode, margin)
    digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()[:8]
    tag = "" if (mode, margin) == ("paper", DEFAULT_MARGIN["paper"]) else f"-{mode}{margin}"
    return f"{_SAFE_RE.sub('_', record_id)[:80]}-{digest}{tag}.png"


def corrupt_records(
    records: Sequence[QARecord],
    image_dir: str | os.PathLike,
    *,
    mode: str = "paper",
    margin: int | None = None,
    overwrite: bool = True,
    **options: float,
) -> list[QARecord]:
    """Writes the corrupted image of every record into ``image_dir`` and returns the records with
    ``corrupted_image`` set.

    ``mode``, ``margin`` and ``options`` are :func:`corrupt_array`'s; the file names carry the mode and
    margin (:func:`corrupted_name`), and the same record, mode and margin always give the same bytes, so a
    rerun rewrites a file with what it held. Several records sharing one image and region get the same
    id-seeded noise only if they share the id; each record's v' is its own.
    """
    margin = _check_mode_margin("corrupt_records", mode, margin)
    image_dir = Path(image_dir).resolve()
    out = []
    for rec in progress(records, total=len(records), desc="corrupting images", unit="image"):
        dst = image_dir / corrupted_name(rec.id, mode, margin)
        if overwrite or not dst.exists():
            corrupt_image_file(rec, dst, mode=mode, margin=margin, **options)
        out.append(replace(rec, corrupted_image=str(dst)))
    return out


def _is_preference_file(path: str) -> bool:
    # Undecodable lines are the loader's to report, with their line numbers.
    for _, obj, _problem in read_jsonl(path):
        if isinstance(obj, dict):
            return "chosen" in obj or "rejected" in obj
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """``firempo-corrupt``: writes v' for every record of a JSONL file and a JSONL that points to them; with
    ``--check``, measures instead whether the v' of such a JSONL still shows the lesion."""
    ap = argparse.ArgumentParser(prog="firempo-corrupt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="question or preference records (JSONL)")
    ap.add_argument("--out", help="corrupting: the records with `corrupted_image` set (required); "
                    "--check: the report as JSON (optional)")
    ap.add_argument("--image-dir", help="folder for the corrupted PNG images (required unless --check)")
    ap.add_argument("--mode", choices=MODES, default="paper", help="paper (default), inpaint or blur")
    ap.add_argument("--margin", type=int, default=None,
                    help=f"pixels to dilate the lesion region by (default: {DEFAULT_MARGIN})")
    ap.add_argument("--sigma-lesion", type=float, default=SIGMA_LESION)
    ap.add_argument("--sigma-whole-image", type=float, default=SIGMA_WHOLE_IMAGE)
    ap.add_argument("--blur-sigma", type=float, default=None, help="blur mode: Gaussian sigma in pixels")
    ap.add_argument("--check", action="store_true",
                    help="measure whether the records' `corrupted_image` still shows the lesion (firempo_kernels."
                    "integrations.data.evidence); prints a markdown table")
    ap.add_argument("--overwrite", action="store_true", help="--check: replace an existing --out file")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad records: fail or skip")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    if args.margin is not None and args.margin < 0:
        ap.error(f"--margin must be >= 0 pixels; got {args.margin}")
    if not args.check and (args.out is None or args.image_dir is None):
        ap.error("--out and --image-dir are required to corrupt images (or give --check to measure them)")
    return run_command("firempo-corrupt", lambda: _check(args) if args.check else _corrupt(args), debug=args.debug)


def _load_records(args: argparse.Namespace) -> list[QARecord]:
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data: no record file at {args.data}")
    load = load_preference_records if _is_preference_file(args.data) else load_qa_records
    # Every image is decoded here, before the first one is written: a bad record is reported (or, with
    # --on-error skip, left out) up front instead of stopping the run half-way.
    return load(args.data, on_error=args.on_error)


def _check(args: argparse.Namespace) -> int:
    from .evidence import evidence_check

    if args.out is not None:
        if Path(args.out).exists() and not args.overwrite:
            raise ValueError(f"--out: {args.out} exists; give --overwrite to replace it, or another path")
        check_writable_file(args.out, "--out")
    records = _load_records(args)
    if not any(r.corrupted_image for r in records):
        raise ValueError(f"--data: no record of {args.data} has a `corrupted_image`; write them with "
                         f"firempo-corrupt --data ... --out ... --image-dir ... first")
    report = evidence_check(records)
    print(report.markdown())
    if args.out is not None:
        with atomic_write(args.out) as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
        print(f"firempo-corrupt: wrote the evidence report to {Path(args.out).resolve()}")
    return 0


def _corrupt(args: argparse.Namespace) -> int:
    check_writable_file(args.out, "--out")
    check_writable_dir(args.image_dir, "--image-dir")
    records = _load_records(args)
    options = {"sigma_lesion": args.sigma_lesion, "sigma_whole_image": args.sigma_whole_image}
    if args.blur_sigma is not None:
        options["blur_sigma"] = args.blur_sigma
    out = corrupt_records(records, args.image_dir, mode=args.mode, margin=args.margin, **options)
    n = write_records(args.out, out)
    regions = sum(r.lesion_mask is not None or r.lesion_bbox is not None for r in records)
    margin = DEFAULT_MARGIN[args.mode] if args.margin is None else args.margin
    how = f"sigma {args.sigma_lesion:g}" if args.mode == "paper" else args.mode
    print(
        f"firempo-corrupt: wrote {n} corrupted images to {Path(args.image_dir).resolve()} "
        f"({regions} with a lesion region, {how}, margin {margin}; {n - regions} whole-image at sigma "
        f"{args.sigma_whole_image:g}) and {n} records to {Path(args.out).resolve()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
