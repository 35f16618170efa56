"""Pixel transforms shared by training, inference and the preprocessing cache, so preprocessing never drifts."""

from __future__ import annotations

import cv2
import numpy as np


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """Squash a float [0, 1] image (H x W or H x W x 3) to ``size`` x ``size`` float32.

    The aspect ratio is not kept: every image fills the square, and a heatmap maps back onto the original
    by the inverse of the same squash. Shrinking uses area averaging (no aliasing of rib edges or noise);
    enlarging uses bilinear interpolation.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, not {size!r}")
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"expected an H x W or H x W x 3 image, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    shrinking = height >= size and width >= size
    resized = cv2.resize(
        np.asarray(pixels, dtype=np.float32),
        (size, size),
        interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
    )
    return np.clip(resized, 0.0, 1.0, out=resized)
