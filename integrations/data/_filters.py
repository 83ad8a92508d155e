"""Small image filters shared by the synthetic scans, the corruption modes and the detectors."""

from __future__ import annotations

import math

import numpy as np


def gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps of standard deviation ``sigma`` pixels, reaching 3 sigma (at least 1)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()
