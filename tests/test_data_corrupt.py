"""Lesion corruption: only the (dilated) lesion changes, the same way every time; the paper's noise byte for byte,
the inpaint and blur modes that remove the lesion."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from firempo_kernels.integrations.data.corrupt import (
    DEFAULT_MARGIN,
    MODES,
    corrupt_array,
    corrupt_image_file,
    corrupted_name,
    dilate,
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


# --------------------------------------------------------------------------------------- modes and margins

PAPER_DIGEST = "d166fdebb0f93d3bc1544271bf25626ce83b0d16172ecf3824edf3915d799970"


def _digest_case():
    rng = np.random.default_rng(2026)
    return rng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8), _disk(24, 20, 10, 9, 5)


def test_paper_mode_is_byte_identical_to_the_stored_digest():
    # The default (and mode="paper", margin 0) must keep writing the bytes every existing store holds.
    image, region = _digest_case()
    for kwargs in ({}, {"mode": "paper"}, {"mode": "paper", "margin": 0}, {"margin": None}):
        h = hashlib.sha256()
        for im in (image, image[..., 0]):
            for r in (region, None):
                h.update(corrupt_array(im, r, record_seed("digest-case"), **kwargs).tobytes())
        assert h.hexdigest() == PAPER_DIGEST, kwargs


def _tissue_scan(seed):
    """A small chest-like scan (body, two darker lungs, texture) with a faint bright nodule in one lung."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:48] + 0.5
    img = np.full((48, 48), 18.0)
    img[((xx - 24) / 22) ** 2 + ((yy - 24) / 23) ** 2 <= 1] = 105.0
    for cx in (14.4, 33.6):
        img[((xx - cx) / 7.2) ** 2 + ((yy - 23) / 16) ** 2 <= 1] = 55.0
    img += rng.normal(0, 5, img.shape)
    lesion = (xx - 33.6) ** 2 + (yy - 16) ** 2 <= 9
    img[lesion] += 30
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lesion


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("margin", [None, 0, 3])
def test_every_mode_changes_only_the_dilated_region_and_is_seeded(mode, margin):
    seed = int(torch.randint(0, 2**31, ()).item())
    image, lesion = _tissue_scan(seed)
    grown = dilate(lesion, DEFAULT_MARGIN[mode] if margin is None else margin)
    for im in (image, np.stack([image] * 3, -1)):
        out = corrupt_array(im, lesion, seed, mode=mode, margin=margin)
        assert out.dtype == np.uint8 and out.shape == im.shape
        np.testing.assert_array_equal(out[~grown], im[~grown])
        changed = np.any(out != im, axis=-1) if out.ndim == 3 else out != im
        assert changed[grown].mean() > 0.3
        np.testing.assert_array_equal(out, corrupt_array(im, lesion, seed, mode=mode, margin=margin))
        if out.ndim == 3 and mode != "paper":  # a grey scan stored as RGB stays grey (paper: noise per channel)
            assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    if mode != "blur":  # the blur has no randomness; the other modes draw from the record's seed
        assert not np.array_equal(out, corrupt_array(im, lesion, seed + 1, mode=mode, margin=margin))


def test_dilate_is_a_euclidean_disc():
    region = np.zeros((11, 11), bool)
    region[5, 5] = True
    yy, xx = np.mgrid[0:11, 0:11]
    np.testing.assert_array_equal(dilate(region, 3), (yy - 5) ** 2 + (xx - 5) ** 2 <= 9)
    np.testing.assert_array_equal(dilate(region, 0), region)


def test_inpaint_removes_the_nodule_and_keeps_the_tissue():
    image, lesion = _tissue_scan(7)
    out = corrupt_array(image, lesion, 7, mode="inpaint").astype(np.float64)
    lung_ring = dilate(lesion, 5) & ~dilate(lesion, 2)
    lung_ring &= np.asarray(image, np.float64) < 80  # lung pixels around the nodule
    before = image[lesion].mean() - image[lung_ring].mean()
    after = out[lesion].mean() - out[lung_ring].mean()
    assert before > 20 and abs(after) < 6  # the nodule stood 30 above its lung; the fill is lung again
    # the fill is textured like the lung around it: not flat, not the paper's noise
    fine = out - np.median(np.lib.stride_tricks.sliding_window_view(np.pad(out, 1, mode="edge"), (3, 3)).reshape(48, 48, 9), -1)
    ratio = fine[dilate(lesion, 2)].std() / fine[lung_ring].std()
    assert 0.5 < ratio < 2.0, ratio


def test_blur_sigma_and_mode_and_margin_checks():
    image, lesion = _tissue_scan(1)
    soft = corrupt_array(image, lesion, 1, mode="blur", blur_sigma=0.5)
    strong = corrupt_array(image, lesion, 1, mode="blur", blur_sigma=8.0)
    assert strong[lesion].astype(float).std() < soft[lesion].astype(float).std()
    with pytest.raises(ValueError, match=r"`mode` must be one of \('paper', 'inpaint', 'blur'\); got 'noise'"):
        corrupt_array(image, lesion, 1, mode="noise")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"`margin` must be an int >= 0 \(pixels\) or None"):
            corrupt_array(image, lesion, 1, mode="inpaint", margin=bad)
    with pytest.raises(ValueError, match="`blur_sigma` must be finite and > 0"):
        corrupt_array(image, lesion, 1, mode="blur", blur_sigma=0.0)


def test_corrupted_names_keep_the_paper_name_and_tag_the_others():
    assert corrupted_name("a/b") == corrupted_name("a/b", "paper", 0)
    assert corrupted_name("a/b").endswith(f"-{hashlib.sha256(b'a/b').hexdigest()[:8]}.png")
    names = {corrupted_name("r", m, k) for m in MODES for k in (0, 2)}
    assert len(names) == 6  # a second mode or margin into the same folder overwrites nothing


def _qa_file(tmp_path):
    image, lesion = _tissue_scan(3)
    Image.fromarray(image).save(tmp_path / "scan.png")
    Image.fromarray(lesion.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    (tmp_path / "qa.jsonl").write_text(json.dumps(
        {"id": "scan-1", "image": "scan.png", "question": "q", "lesion_mask": "mask.png"}) + "\n")
    return tmp_path / "qa.jsonl", image, lesion


def test_command_modes_margins_and_errors(tmp_path, capsys):
    qa, image, lesion = _qa_file(tmp_path)
    args = ["--data", str(qa), "--image-dir", str(tmp_path / "vp")]
    assert main(args + ["--out", str(tmp_path / "inp.jsonl"), "--mode", "inpaint", "--margin", "3"]) == 0
    assert "inpaint, margin 3" in capsys.readouterr().out
    rec = load_qa_records(tmp_path / "inp.jsonl")[0]
    out = np.asarray(Image.open(rec.corrupted_image))
    np.testing.assert_array_equal(out, corrupt_array(image, lesion, record_seed("scan-1"), mode="inpaint", margin=3))
    assert main(args + ["--out", str(tmp_path / "paper.jsonl")]) == 0
    assert load_qa_records(tmp_path / "paper.jsonl")[0].corrupted_image != rec.corrupted_image
    assert Path(rec.corrupted_image).is_file()  # the paper run left the inpaint run's image alone
    capsys.readouterr()
    for bad, message in (
        (args + ["--out", str(tmp_path / "x.jsonl"), "--margin", "-2"], "--margin must be >= 0"),
        (["--data", str(qa), "--image-dir", str(tmp_path / "vp")], "--out and --image-dir are required"),
        (args + ["--out", str(tmp_path / "x.jsonl"), "--mode", "smudge"], "invalid choice: 'smudge'"),
    ):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2 and message in capsys.readouterr().err
    # --check on records without v': one message, exit 2
    assert main(["--check", "--data", str(qa)]) == 2
    assert "has a `corrupted_image`" in capsys.readouterr().err
