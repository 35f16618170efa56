"""Pixel transforms shared by training, inference and the preprocessing cache, so preprocessing never drifts.

:func:`prepare_image` is the one path from a read image to the uint8 model-size image: optional border crop,
squash-resize (or a centre crop to a square first, as torchxrayvision's weights expect), 8-bit quantisation,
optional contrast enhancement. The cache builder stores its output and a loaded model (medlens.inference)
computes it live, both with the options a checkpoint's manifest records.
"""

from __future__ import annotations

import cv2
import numpy as np

CONTRASTS = ("none", "histeq", "clahe")
"""``none``; ``histeq``: global histogram equalisation; ``clahe``: contrast-limited adaptive equalisation."""

RESIZE_MODES = ("squash", "centre-crop")
"""``squash``: the whole image stretched to the square; ``centre-crop``: its centred square of side
min(H, W) resized, as torchxrayvision's ``XRayCenterCrop`` then ``XRayResizer`` do."""

CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = 8
AUTO_CROP = "auto"
MAX_CROP_FRACTION = 0.45
AUTO_CROP_LIMIT = 0.2
"""``auto`` never trims more than this fraction of the height or width from any one side."""
MARGIN_EXTREME = 0.06
MARGIN_SHARE = 0.97
"""A margin row/column: at least MARGIN_SHARE of its pixels within MARGIN_EXTREME of black or of white."""


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


def resize_map(heatmap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A model-input map laid over an image of ``shape`` (H0, W0, ...).

    The model saw a squash-resize of the whole image, so stretching the map to (H0, W0) with the same
    pixel-centre convention (OpenCV's) puts every value back over the pixels it came from.
    """
    height, width = shape[:2]
    if heatmap.shape == (height, width):
        return heatmap.astype(np.float32, copy=False)
    return cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def prepare_image(
    pixels: np.ndarray, size: int, contrast: str = "none", crop_border: float | str = 0.0, resize: str = "squash"
) -> np.ndarray:
    """A read float [0, 1] image -> the uint8 ``size`` x ``size`` image a model sees (before normalising)."""
    top, bottom, left, right = view_box(pixels, crop_border, resize)
    cropped = pixels[top:bottom, left:right]
    quantised = np.rint(resize_image(cropped, size) * 255.0).astype(np.uint8)
    return enhance_contrast(quantised, contrast)


def enhance_contrast(image: np.ndarray, contrast: str) -> np.ndarray:
    """``histeq`` or ``clahe`` on a uint8 image; a colour image is equalised on its luma only."""
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast option {contrast!r}; choose one of {', '.join(CONTRASTS)}")
    if contrast == "none":
        return image
    if image.ndim == 3:
        ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
        ycrcb[..., 0] = enhance_contrast(np.ascontiguousarray(ycrcb[..., 0]), contrast)
        return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)
    if contrast == "histeq":
        return cv2.equalizeHist(image)
    return cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(image)


def crop_border_of(pixels: np.ndarray, crop_border: float | str) -> np.ndarray:
    """``pixels`` without their border: a fixed fraction of each side, or ``"auto"`` margins (see below).

    ``auto`` trims, from each side inwards, the rows/columns that are almost entirely black or white: the
    padding, frames and burned-in text bands (white letters on black) of exported X-rays. It stops at the
    first row/column holding image content, and never takes more than AUTO_CROP_LIMIT of a side.
    """
    top, bottom, left, right = crop_box(pixels, crop_border)
    return pixels[top:bottom, left:right]


def view_box(pixels: np.ndarray, crop_border: float | str, resize: str = "squash") -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the region of ``pixels`` that :func:`prepare_image` resizes.

    The border crop's box, and with ``centre-crop`` the centred square inside it (the odd pixel of an odd
    difference left on the top or left side, as torchxrayvision's crop leaves it).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    top, bottom, left, right = crop_box(pixels, crop_border)
    if resize == "centre-crop":
        side = min(bottom - top, right - left)
        top += (bottom - top) // 2 - side // 2
        left += (right - left) // 2 - side // 2
        bottom, right = top + side, left + side
    return top, bottom, left, right


def crop_box(pixels: np.ndarray, crop_border: float | str) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the region :func:`crop_border_of` keeps."""
    height, width = pixels.shape[:2]
    if crop_border == AUTO_CROP:
        grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
        extreme = (grey <= MARGIN_EXTREME) | (grey >= 1.0 - MARGIN_EXTREME)
        rows, cols = _margin(extreme.mean(axis=1)), _margin(extreme.mean(axis=0))
        return rows[0], height - rows[1], cols[0], width - cols[1]
    if isinstance(crop_border, str) or not 0.0 <= crop_border < MAX_CROP_FRACTION:
        raise ValueError(
            f"crop_border must be {AUTO_CROP!r} or a fraction in [0, {MAX_CROP_FRACTION}), not {crop_border!r}"
        )
    dy, dx = round(height * crop_border), round(width * crop_border)
    return dy, height - dy, dx, width - dx


def _margin(share: np.ndarray) -> tuple[int, int]:
    """How many leading and trailing entries of ``share`` are margin lines, each capped at AUTO_CROP_LIMIT."""
    limit = int(len(share) * AUTO_CROP_LIMIT)
    is_margin = share >= MARGIN_SHARE

    def run(flags: np.ndarray) -> int:
        inside = np.flatnonzero(~flags[:limit])
        return int(inside[0]) if len(inside) else limit

    return run(is_margin), run(is_margin[::-1])
