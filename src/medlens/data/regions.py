"""Regions of an image that an audit covers or measures: the outer band, burned-in text, the lung fields.

Every region is a boolean mask in the frame of the image it is asked for, so one region serves the read
image and the model-size one alike. Covering (:func:`cover`) replaces a region's pixels in one of three
ways; a blank band has an edge of its own that a model may read, so the audit reports all three:

- ``blank``: the median of the pixels around the region;
- ``blur``: a Gaussian blur as wide as the band (what is written there becomes a smudge);
- ``inpaint``: OpenCV's Telea inpainting from the region's surroundings.

Burned-in text (:func:`find_text`) is found by a heuristic, not read: bright strokes far above their
surroundings (a white top-hat a few percent of the image wide, thresholded well above the film's own
contrast) that reach near white, grouped into compact blobs of a text line's height, in the outer quarter
of the image where annotations, side markers and stamps sit. It finds print and markers; it misses dark or
low-contrast text and anything in the middle of the film; bright bone edges of an overexposed film, clips
and electrodes near the edge can pass for text.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from medlens.errors import DataSourceError

COVER_MODES = ("blank", "blur", "inpaint")
BORDER_SHARES = (0.04, 0.08)
"""Widths of the outer band covered, as shares of the image side (rounded up to whole pixels)."""
CENTRAL_SHARE = (0.6, 0.7)
"""The central region, when no lung masks are known: its width and height as shares of the image's."""
_TEXT_OUTER = 0.25
_TEXT_HEIGHT = (0.008, 0.08)
_TEXT_CONTRAST = 0.25
_TEXT_BRIGHT = 0.85
"""Burned-in print is near white; bone, skin folds and wires near the edge seldom are."""
_MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def border_widths(shape: tuple[int, ...], shares: tuple[float, ...] = BORDER_SHARES) -> list[int]:
    """The band widths in pixels of an image of ``shape``: each share of its shorter side, at least 1 px."""
    side = min(shape[:2])
    return [max(1, int(np.ceil(share * side))) for share in shares]


def border_band(shape: tuple[int, ...], width: int) -> np.ndarray:
    """The outer band ``width`` pixels wide."""
    band = np.ones(shape[:2], dtype=bool)
    band[width:-width, width:-width] = False
    return band


def central_region(shape: tuple[int, ...], share: tuple[float, float] = CENTRAL_SHARE) -> np.ndarray:
    """The centred box of ``share`` of the width and height: where a frontal film's lungs mostly lie."""
    height, width = shape[:2]
    dy, dx = round(height * (1 - share[1]) / 2), round(width * (1 - share[0]) / 2)
    region = np.zeros((height, width), dtype=bool)
    region[dy : height - dy, dx : width - dx] = True
    return region


def cover(image: np.ndarray, region: np.ndarray, mode: str) -> np.ndarray:
    """A copy of ``image`` (uint8 or float, H x W or H x W x C) with ``region`` covered as ``mode`` says."""
    if mode not in COVER_MODES:
        raise ValueError(f"cover mode must be one of {COVER_MODES}, not {mode!r}")
    out = image.copy()
    if not region.any():
        return out
    if mode == "blank":
        ring = cv2.dilate(region.astype(np.uint8), np.ones((5, 5), np.uint8), iterations=2).astype(bool) & ~region
        around = image[ring] if ring.any() else image.reshape(-1, *image.shape[2:])
        out[region] = np.median(around, axis=0).astype(image.dtype)
        return out
    if mode == "blur":
        # As wide as the region is thick: a band's writing, or a word, becomes a smudge.
        sigma = max(1.0, 2.0 * float(cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3).max()))
        blurred = cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        out[region] = blurred[region]
        return out
    as_uint8 = image if image.dtype == np.uint8 else np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    painted = cv2.inpaint(as_uint8, region.astype(np.uint8), 3, cv2.INPAINT_TELEA)
    out[region] = painted[region] if image.dtype == np.uint8 else painted[region].astype(image.dtype) / 255.0
    return out


def find_text(pixels: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Boxes ``(x, y, w, h)`` of likely burned-in text or markers, as shares of the image's width and height."""
    grey = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
    grey = grey.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 1.0)
    height, width = grey.shape
    side = min(height, width)
    kernel = np.ones((max(5, round(0.03 * side)),) * 2, np.uint8)
    tophat = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, kernel)
    strokes = (tophat > _TEXT_CONTRAST).astype(np.uint8)
    # Letters of one word touch once widened sideways; a blob is then a word, a marker or a stamp.
    joined = cv2.dilate(strokes, np.ones((1, max(1, round(0.01 * side))), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    outer = ~central_region(grey.shape, (1 - 2 * _TEXT_OUTER, 1 - 2 * _TEXT_OUTER))
    boxes = []
    for component in range(1, count):
        x, y, w, h, area = stats[component]
        tall_enough = _TEXT_HEIGHT[0] * side <= h <= _TEXT_HEIGHT[1] * side
        compact = w <= 0.4 * width and area >= 0.2 * w * h
        if not (tall_enough and compact and outer[y + h // 2, x + w // 2]):
            continue
        blob = (labels[y : y + h, x : x + w] == component) & strokes[y : y + h, x : x + w].astype(bool)
        if blob.any() and grey[y : y + h, x : x + w][blob].max() >= _TEXT_BRIGHT:
            pad = max(1, round(0.2 * h))
            x0, y0 = max(0, x - pad), max(0, y - pad)
            x1, y1 = min(width, x + w + pad), min(height, y + h + pad)
            boxes.append((x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height))
    return boxes


def box_mask(boxes: list[tuple[float, float, float, float]], shape: tuple[int, ...]) -> np.ndarray:
    """The union of boxes given as shares of the width and height, in an image of ``shape``."""
    height, width = shape[:2]
    region = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        x0, y0 = int(np.floor(x * width)), int(np.floor(y * height))
        x1, y1 = int(np.ceil((x + w) * width)), int(np.ceil((y + h) * height))
        region[y0:y1, x0:x1] = True
    return region


def read_mask(folder: str | Path, image: str | Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The mask ``FOLDER/<image stem>.<png|jpg|...>`` (non-zero = inside), stretched to ``shape``; None if absent."""
    stem = Path(image).stem
    for suffix in _MASK_SUFFIXES:
        path = Path(folder) / f"{stem}{suffix}"
        if path.is_file():
            mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise DataSourceError(f"{path}: not a readable mask image; masks are greyscale PNG or JPEG")
            return cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 127
    return None
