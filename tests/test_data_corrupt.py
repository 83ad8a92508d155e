"""Lesion corruption: only the lesion changes, with the paper's noise statistics, the same way every time."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from firempo_kernels.integrations.data.corrupt import (
    corrupt_array,
    corrupt_image_file,
    lesion_region,
    main,
    record_seed,
)
from firempo_kernels.integrations.data.records import QARecord, load_qa_records


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize("channels", [None, 3])
def test_noise_only_inside_the_mask_with_sigma_45_per_channel(channels):
    shape = (96, 80) if channels is None else (96, 80, channels)
    rng = np.random.default_rng(torch.initial_seed())  # the session seed (fresh with FIREMPO_RANDOM_SEED)
    image = rng.integers(100, 156, size=shape, dtype=np.uint8)  # far enough from 0/255 that clipping is rare
    region = _disk(96, 80, 40, 35, 22)
    out = corrupt_array(image, region, seed=record_seed("case-1"))
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[~region], image[~region])
    diff = out[region].astype(np.float64) - image[region].astype(np.float64)
    n = diff.size
    assert abs(diff.mean()) < 4 * 45 / np.sqrt(n)
    assert abs(diff.std() - np.sqrt(45**2 + 1 / 12)) < 4 * 45 / np.sqrt(2 * n) + 1.0  # +1: clipping at 0/255
    if channels:
        flat = diff.reshape(-1, channels)
        corr = np.corrcoef(flat.T)[np.triu_indices(channels, 1)]
        assert np.all(np.abs(corr) < 4 / np.sqrt(flat.shape[0]))  # independent noise per channel


def test_whole_image_sigma_12_without_a_region_and_for_an_empty_mask():
    image = np.full((120, 100), 128, np.uint8)
    for region in (None, np.zeros((120, 100), bool)):
        out = corrupt_array(image, region, seed=3)
        diff = out.astype(np.float64) - 128
        assert (diff != 0).mean() > 0.9
        assert abs(diff.std() - np.sqrt(12**2 + 1 / 12)) < 4 * 12 / np.sqrt(2 * diff.size)


def test_clipped_to_the_pixel_range():
    image = np.full((64, 64), 250, np.uint8)
    out = corrupt_array(image, np.ones((64, 64), bool), seed=5)
    assert out.max() == 255 and (out == 255).mean() > 0.4 and out.min() < 200


def test_seed_is_fixed_per_record_id():
    assert record_seed("synth-00017") == int.from_bytes(hashlib.sha256(b"synth-00017").digest()[:8], "little")
    image = np.full((32, 32, 3), 90, np.uint8)
    a = corrupt_array(image, None, record_seed("r1"))
    np.testing.assert_array_equal(a, corrupt_array(image, None, record_seed("r1")))
    assert not np.array_equal(a, corrupt_array(image, None, record_seed("r2")))


def test_bad_arguments():
    with pytest.raises(TypeError, match="`image` must be a uint8 numpy array; got float32"):
        corrupt_array(np.zeros((4, 4), np.float32), None, 0)
    with pytest.raises(ValueError, match=r"`region` must be a bool array of shape \(4, 4\)"):
        corrupt_array(np.zeros((4, 4), np.uint8), np.ones((3, 4), bool), 0)
    with pytest.raises(ValueError, match="`image` must be"):
        corrupt_array(np.zeros((4,), np.uint8), None, 0)
    with pytest.raises(ValueError, match="`sigma_lesion` must be finite"):
        corrupt_array(np.zeros((4, 4), np.uint8), None, 0, sigma_lesion=float("nan"))
    with pytest.raises(TypeError, match="`record_id` must be a non-empty str"):
        record_seed("")


def test_box_covers_pixel_centres():
    rec = QARecord(id="b", image="x", question="q", lesion_bbox=(1.0, 2.0, 3.6, 4.0))
    region = lesion_region(rec, (6, 5))
    expected = np.zeros((5, 6), bool)
    expected[2:4, 1:4] = True
    np.testing.assert_array_equal(region, expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_files_in_every_mode_and_the_command(tmp_path, mode, capsys):
    rng = np.random.default_rng(0)
    shape = {"L": (40, 48), "RGB": (40, 48, 3), "RGBA": (40, 48, 4)}[mode]
    pixels = rng.integers(60, 190, size=shape, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    mask = _disk(40, 48, 20, 30, 8)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    records = [
        {"id": "with-mask", "image": "scan.png", "question": "q", "lesion_mask": "mask.png"},
        {"id": "with-box", "image": "scan.png", "question": "q", "lesion_bbox": [0, 0, 10, 12]},
        {"id": "nothing", "image": "scan.png", "question": "q"},
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert main(["--data", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                 "--image-dir", str(tmp_path / "v_prime")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 corrupted images to" in printed and str(tmp_path / "out.jsonl") in printed
    out = load_qa_records(tmp_path / "out.jsonl")
    regions = {"with-mask": mask, "with-box": lesion_region(out[1], (48, 40)), "nothing": np.ones((40, 48), bool)}
    for rec in out:
        noisy = np.asarray(Image.open(rec.corrupted_image))
        assert noisy.shape == pixels.shape
        changed = np.any(noisy != pixels, axis=-1) if noisy.ndim == 3 else noisy != pixels
        assert not changed[~regions[rec.id]].any()
        assert changed[regions[rec.id]].mean() > 0.5
        if mode == "RGBA":
            np.testing.assert_array_equal(noisy[..., 3], pixels[..., 3])  # alpha untouched
        again = tmp_path / f"again-{rec.id}.png"
        corrupt_image_file(rec, again)
        np.testing.assert_array_equal(np.asarray(Image.open(again)), noisy)  # deterministic per id
