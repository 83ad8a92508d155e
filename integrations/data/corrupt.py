"""Lesion corruption, as the paper builds the image v': noise on the lesion only, seeded per record.

Zero-mean Gaussian noise with sigma = 45 (on the 0-255 scale) is added independently to every channel of
every pixel inside the lesion region, then the result is rounded and clipped to [0, 255]; a record with no
region (no mask, no box) gets sigma = 12 noise on the whole image instead. The generator is seeded from the
record id alone (SHA-256, not Python's salted ``hash``), so the same record gets the same v' on every
machine and every run. Corrupted images are written as PNG: a lossy format would alter the pixels outside
the lesion as well.

Command line: ``firempo-corrupt --data records.jsonl --out records.corrupted.jsonl --image-dir corrupted/``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cli import atomic_write, check_writable_dir, check_writable_file, run_command
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


def corrupt_array(
    image: np.ndarray,
    region: np.ndarray | None,
    seed: int,
    *,
    sigma_lesion: float = SIGMA_LESION,
    sigma_whole_image: float = SIGMA_WHOLE_IMAGE,
) -> np.ndarray:
    """Adds the lesion noise to one image.

    Args:
        image: uint8 ``[H, W]`` (grayscale) or ``[H, W, C]`` (any number of channels, all noised).
        region: bool ``[H, W]``, True on the lesion, or None for whole-image noise at ``sigma_whole_image``.
            An all-False region is treated as None (the lesion was not found).
        seed: the generator seed (see :func:`record_seed`).

    Returns:
        uint8 array of the shape of ``image``; pixels outside ``region`` are unchanged.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(
            f"corrupt_array: `image` must be a uint8 numpy array; got "
            f"{getattr(image, 'dtype', type(image).__name__)}"
        )
    if image.ndim not in (2, 3):
        raise ValueError(f"corrupt_array: `image` must be [H, W] or [H, W, C]; got shape {image.shape}")
    for name, s in (("sigma_lesion", sigma_lesion), ("sigma_whole_image", sigma_whole_image)):
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"corrupt_array: `{name}` must be finite and >= 0; got {s}")
    if region is not None:
        if not isinstance(region, np.ndarray) or region.shape != image.shape[:2]:
            raise ValueError(
                f"corrupt_array: `region` must be a bool array of shape {image.shape[:2]}; "
                f"got {getattr(region, 'shape', type(region).__name__)}"
            )
        region = region.astype(bool)
        if not region.any():
            region = None
    rng = np.random.default_rng(seed)
    sigma = sigma_whole_image if region is None else sigma_lesion
    noisy = np.clip(np.rint(image.astype(np.float64) + rng.normal(0.0, sigma, size=image.shape)), 0, 255)
    noisy = noisy.astype(np.uint8)
    if region is None:
        return noisy
    out = image.copy()
    out[region] = noisy[region]
    return out


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


def corrupt_image_file(record: QARecord, out_path: str | os.PathLike, **sigmas: float) -> str:
    """Writes the corrupted image of ``record`` to ``out_path`` (PNG) and returns the path.

    Modes L and RGB are noised as they are; LA and RGBA keep their alpha; palette and 1-bit images are
    expanded to RGB and L first. 16-bit and float images are refused: the noise is on the 0-255 scale.
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
    out = corrupt_array(np.ascontiguousarray(arr), region, record_seed(record.id), **sigmas)
    if alpha is not None:
        out = np.concatenate([out if out.ndim == 3 else out[..., None], alpha], axis=-1)
    with atomic_write(out_path, "wb") as f:
        Image.fromarray(out, mode=None).save(f, format="PNG")
    return str(out_path)


def corrupted_name(record_id: str) -> str:
    """A file name for the corrupted image of a record: its id made path-safe, plus a short hash."""
    digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()[:8]
    return f"{_SAFE_RE.sub('_', record_id)[:80]}-{digest}.png"


def corrupt_records(
    records: Sequence[QARecord], image_dir: str | os.PathLike, *, overwrite: bool = True, **sigmas: float
) -> list[QARecord]:
    """Writes the corrupted image of every record into ``image_dir`` and returns the records with
    ``corrupted_image`` set. Several records sharing one image and region get the same id-seeded noise only
    if they share the id; each record's v' is its own."""
    image_dir = Path(image_dir).resolve()
    out = []
    for rec in progress(records, total=len(records), desc="corrupting images", unit="image"):
        dst = image_dir / corrupted_name(rec.id)
        if overwrite or not dst.exists():
            corrupt_image_file(rec, dst, **sigmas)
        out.append(replace(rec, corrupted_image=str(dst)))
    return out


def _is_preference_file(path: str) -> bool:
    # Undecodable lines are the loader's to report, with their line numbers.
    for _, obj, _problem in read_jsonl(path):
        if isinstance(obj, dict):
            return "chosen" in obj or "rejected" in obj
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """``firempo-corrupt``: writes v' for every record of a JSONL file and a JSONL that points to them."""
    ap = argparse.ArgumentParser(prog="firempo-corrupt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="question or preference records (JSONL)")
    ap.add_argument("--out", required=True, help="where to write the records with `corrupted_image` set")
    ap.add_argument("--image-dir", required=True, help="folder for the corrupted PNG images")
    ap.add_argument("--sigma-lesion", type=float, default=SIGMA_LESION)
    ap.add_argument("--sigma-whole-image", type=float, default=SIGMA_WHOLE_IMAGE)
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad records: fail or skip")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    return run_command("firempo-corrupt", lambda: _corrupt(args), debug=args.debug)


def _corrupt(args: argparse.Namespace) -> int:
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data: no record file at {args.data}")
    check_writable_file(args.out, "--out")
    check_writable_dir(args.image_dir, "--image-dir")
    load = load_preference_records if _is_preference_file(args.data) else load_qa_records
    # Every image is decoded here, before the first one is written: a bad record is reported (or, with
    # --on-error skip, left out) up front instead of stopping the run half-way.
    records = load(args.data, on_error=args.on_error)
    out = corrupt_records(
        records, args.image_dir, sigma_lesion=args.sigma_lesion, sigma_whole_image=args.sigma_whole_image
    )
    n = write_records(args.out, out)
    regions = sum(r.lesion_mask is not None or r.lesion_bbox is not None for r in records)
    print(
        f"firempo-corrupt: wrote {n} corrupted images to {Path(args.image_dir).resolve()} "
        f"({regions} with a lesion region at sigma {args.sigma_lesion:g}, {n - regions} whole-image at sigma "
        f"{args.sigma_whole_image:g}) and {n} records to {Path(args.out).resolve()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
