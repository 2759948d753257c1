"""Sharpness: the share of an image's energy that a sigma-1 Gaussian blur removes (no weights).

    sharpness(i) = sum (i - G*i)^2 / sum i^2

with `i` the grayscale image as [0, 1] intensities and `G*i` its Gaussian blur, sigma 1. Blurry or
flat images score near 0; fine detail and noise push it up. The prompt is not used.

Choices that fix the number (pinned by tests/test_metrics.py):
- grayscale: PIL's `convert("L")` (ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000, rounded to
  uint8), divided by 255;
- blur: `scipy.ndimage.gaussian_filter(i, sigma=1.0, mode="reflect", truncate=4.0)`: a separable
  9-tap kernel (radius 4) normalised to sum 1; "reflect" mirrors about the edge so a constant image
  blurs to itself and scores exactly 0 up to float rounding;
- an all-black image (sum i^2 = 0) scores 0, not NaN: it has no detail to lose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from catimage.metrics.base import MetricParams, Scorer, parse_params

if TYPE_CHECKING:
    from PIL import Image

SIGMA = 1.0
MODE = "reflect"
TRUNCATE = 4.0


class SharpnessParams(MetricParams):
    """No params: the definition is fixed so that tables built anywhere compare."""


def grayscale(image: Image.Image) -> np.ndarray:
    """[0, 1] float64 intensities via PIL's ITU-R 601-2 luma."""
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def sharpness(gray: np.ndarray) -> float:
    """sum (i - G*i)^2 / sum i^2 for a 2-D [0, 1] array; 0 for an all-black image."""
    from scipy.ndimage import gaussian_filter

    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2:
        raise ValueError(f"sharpness needs a 2-D grayscale array, got shape {gray.shape}")
    energy = float(np.sum(gray * gray))
    if energy == 0.0:
        return 0.0
    blurred = gaussian_filter(gray, sigma=SIGMA, mode=MODE, truncate=TRUNCATE)
    residual = gray - blurred
    return float(np.sum(residual * residual)) / energy


class SharpnessScorer(Scorer):
    """Per-image sharpness; cheap, CPU-only, batch size only bounds memory."""

    name = "sharpness"

    def __init__(self, device: str | None = None, batch_size: int = 8, **params: object) -> None:
        super().__init__(batch_size)
        parse_params(SharpnessParams, self.name, dict(params))
        # `device` is accepted for a uniform constructor; the blur runs in numpy on the CPU.

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        return np.array([sharpness(grayscale(im)) for im in images], dtype=np.float64)
