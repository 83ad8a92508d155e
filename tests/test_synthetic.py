"""The synthetic scans: deterministic per seed, ground truth that agrees with the pixels, lesions that are
faint (inside their lung, a few texture deviations above it) rather than the brightest thing in the image."""

import json

import numpy as np
import pytest

from firempo_kernels.integrations.data import load_qa_records
from firempo_kernels.integrations.data import synthetic as S


def _scans(n, seed=0, size=32, **kw):
    rng = np.random.default_rng([seed, size])
    return [S._draw_scan(i, rng, size, 1.0, **kw) for i in range(n)]


def _lungs(size):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    ax, ay = S.LUNG_HALF_AXES
    return [((xx - cx * size) / (ax * size)) ** 2 + ((yy - S.LUNG_CENTER_Y * size) / (ay * size)) ** 2 <= 1
            for cx in S.LUNG_CENTERS_X]


def test_same_arguments_same_bytes(tmp_path):
    a = S.make_synthetic_vqa(tmp_path / "a", num_images=5, seed=3)
    b = S.make_synthetic_vqa(tmp_path / "b", num_images=5, seed=3)
    c = S.make_synthetic_vqa(tmp_path / "c", num_images=5, seed=4)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("image", "lesion_mask")}
                       for x in p.read_text().splitlines()]
    assert strip(a) == strip(b)
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert any((tmp_path / "a" / "images" / n.name).read_bytes() != n.read_bytes()
               for n in (tmp_path / "c" / "images").iterdir())


@pytest.mark.parametrize("size", [32, 48])
def test_ground_truth_agrees_with_the_pixels(size):
    lungs = _lungs(size)
    for img, mask, scan in _scans(60, seed=1, size=size):
        assert mask.any()
        lung = lungs[1] if scan.side == "left" else lungs[0]  # the patient's left is the image's right
        assert (mask & ~lung).sum() == 0, "the lesion leaves its lung field"
        ys, xs = np.nonzero(mask)
        assert (xs.mean() > size / 2) == (scan.side == "left")
        assert (ys.mean() < S.LUNG_CENTER_Y * size) == (scan.level == "upper")
        low, high = S.RADIUS_RANGE[scan.size]
        assert low * size <= scan.radius <= high * size
        assert S.CONTRAST_RANGE[0] <= scan.contrast <= S.CONTRAST_RANGE[1]


def test_lesions_are_faint():
    """Inside the mask the scan stands above the lung around it by about the drawn contrast, which is a few
    times the texture's spread, and far below the old 150 grey levels; no mask brightens the body."""
    lungs = _lungs(32)
    gaps, texture = [], []
    for img, mask, scan in _scans(80, seed=2):
        lung = lungs[1] if scan.side == "left" else lungs[0]
        around = lung & ~mask
        gaps.append(img[mask].mean() - img[around].mean())
        texture.append(img[lungs[0] if scan.side == "left" else lungs[1]].std())
    gaps, texture = np.array(gaps), np.array(texture)
    assert 5 < np.median(gaps) < 40 and gaps.max() < 60
    assert 5 < np.median(texture) < 14  # ribs, blotches and grain in the lesion-free lung


def test_brightest_window_no_longer_names_the_side():
    """The fault of the old scans: the brightest 3x3 window named the lesion's side on every scan."""
    right = 0
    scans = _scans(200, seed=3)
    for img, mask, scan in scans:
        windows = np.lib.stride_tricks.sliding_window_view(img.astype(float), (3, 3)).mean(axis=(-1, -2))
        y, x = np.unravel_index(np.argmax(windows), windows.shape)
        right += (x + 1.5 > 16) == (scan.side == "left")
    assert right / len(scans) < 0.8


def test_contrast_range_is_an_argument(tmp_path):
    bright = _scans(20, seed=4, contrast_range=(120.0, 150.0))
    assert all(120 <= s.contrast <= 150 for _, _, s in bright)
    path = S.make_synthetic_vqa(tmp_path, num_images=2, contrast=(100, 100), lesion_rate=1.0)
    assert len(load_qa_records(path)) == 10
    with pytest.raises(ValueError, match="`contrast` must be"):
        S.make_synthetic_vqa(tmp_path, num_images=2, contrast=(50, 10))


def test_question_kind(tmp_path):
    assert S.question_kind("synth-train-00003-side") == "side"
    assert S.question_kind("synth-train-00003") is None
    records = load_qa_records(S.make_synthetic_vqa(tmp_path, num_images=2, lesion_rate=1.0))
    assert [S.question_kind(r) for r in records[:5]] == ["side", "level", "size", "presence", "where"]
