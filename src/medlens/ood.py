"""Does an image look like a chest X-ray? A cheap, explainable out-of-distribution guard.

A chest-X-ray classifier answers for any picture it is given, a face or a blank page included. Before its
findings are shown, five named checks look at the image. Each measures one plain statistic and maps it
linearly onto a score in [0, 1] between a value typical of chest films (0) and one they do not reach (1);
the image is flagged when any score reaches 0.5, and the reasons name the checks that fired:

- ``colour``: the share of clearly coloured pixels. Radiographs are grey; a few have a coloured arrow.
- ``tones``: the entropy of the grey-level histogram. Blank, constant or mostly-black images have few tones.
- ``texture``: fine detail (mean absolute Laplacian) relative to contrast. Films are smooth at 128 px;
  photos of hair, fur, foliage or noise are not.
- ``layout``: a frontal chest film is brightest low in the middle (heart, diaphragm, abdomen) and darker
  above it (lungs); a portrait is brightest in the upper middle (the face) above darker clothes.
- ``shape``: films are close to square; panoramas and strips are not.

Measured on ../shared/data: all 507 photos flagged (499 LFW faces, 8 face-probes), and 2 of 344 real chest
X-rays (0.6%: a phone photo of a monitor with a purple cast, and one film shifted to the side). Colour does
most of the work there; photos made grey are caught by the layout check alone 82% of the time.
The statistics are computed on a 128 x 128 squash of the image, so the guard costs 1-2 ms.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medlens.data.readers import LoadedImage
from medlens.data.transforms import resize_image
from medlens.faces.pipeline import FACE_KIND

SIDE = 128
"""Statistics are computed on a SIDE x SIDE squash of the image."""

FLAG_AT = 0.5
COLOURED_CHROMA = 0.08
"""A pixel whose channels spread by more than this (of the full range) counts as coloured."""
HISTOGRAM_BINS = 32
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class Check:
    """One statistic, and the values at which it scores 0 (typical of chest films) and 1 (not)."""

    name: str
    typical: float
    atypical: float
    reason: str

    def score(self, value: float) -> float:
        return float(np.clip((value - self.typical) / (self.atypical - self.typical), 0.0, 1.0))


CHECKS = {
    check.name: check
    for check in (
        Check("colour", 0.02, 0.10, "it is in colour ({value:.0%} of pixels coloured); radiographs are grey"),
        Check("tones", 3.0, 2.0, "it has few grey tones (histogram entropy {value:.1f} bits): blank or nearly so"),
        Check("texture", 0.45, 0.75, "it has fine texture ({value:.2f}) that smooth radiographs lack"),
        Check("layout", 0.5, -0.5, "its brightness layout ({value:+.2f}) is not a frontal chest film's"),
        Check("shape", 1.6, 2.4, "its sides differ too much ({value:.1f} : 1) for a chest film"),
    )
}


@dataclass
class OodResult:
    """Whether an image is flagged, its overall score (the largest check score) and why."""

    flag: bool
    score: float
    checks: dict[str, float] = field(default_factory=dict)
    measures: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def assess_xray(pixels: np.ndarray, colour: np.ndarray | None = None) -> OodResult:
    """Score ``pixels`` (float [0, 1], H x W or H x W x 3) for not looking like a chest X-ray.

    ``colour`` is an RGB copy of the same image for the colour check, needed when ``pixels`` are already
    grey (see :func:`colour_sample`); ``None`` with grey pixels means the file held no colour.
    """
    if pixels.ndim == 3:
        colour = pixels if colour is None else colour
        grey = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        grey = pixels
    height, width = grey.shape
    small = resize_image(grey, SIDE)
    measures = {
        "colour": coloured_share(colour) if colour is not None else 0.0,
        "tones": _entropy(small),
        "texture": _texture(small),
        "layout": _layout(small),
        "shape": max(height, width) / max(min(height, width), 1),
    }
    checks = {name: CHECKS[name].score(value) for name, value in measures.items()}
    reasons = [CHECKS[name].reason.format(value=measures[name]) for name, value in checks.items() if value >= FLAG_AT]
    score = max(checks.values())
    return OodResult(score >= FLAG_AT, score, checks, measures, reasons)


def assess_upload(loaded: LoadedImage, data: bytes) -> OodResult:
    """:func:`assess_xray` of a read image file, with the colour its bytes hold where the reader made it grey
    (PNG and JPEG; a DICOM's pixels are what they are)."""
    colour = colour_sample(data) if loaded.format != "dicom" and loaded.pixels.ndim == 2 else None
    return assess_xray(loaded.pixels, colour)


def colour_sample(data: bytes, side: int = SIDE) -> np.ndarray | None:
    """A small float RGB copy of PNG or JPEG bytes, or ``None`` for grey images and anything else (DICOM).

    For a model that reads images as grey: the colour check needs the colour the reader has dropped.
    JPEGs are decoded at reduced scale, so this costs little more than the header for most uploads.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.mode in _GREY_MODES:
            return None
        image.draft("RGB", (side, side))
        image = image.convert("RGB")
        image.thumbnail((side, side))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    return np.asarray(image, dtype=np.float32) / 255.0


def coloured_share(rgb: np.ndarray) -> float:
    """The share of pixels whose R, G, B spread by more than :data:`COLOURED_CHROMA`."""
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    return float((chroma > COLOURED_CHROMA).mean())


def _entropy(grey: np.ndarray) -> float:
    counts, _ = np.histogram(grey, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: never -0.0


def _texture(grey: np.ndarray) -> float:
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(np.abs(laplacian).mean() / max(float(grey.std()), 1e-3))


def _layout(grey: np.ndarray) -> float:
    """Mean standardised brightness of the lower-middle quarter minus that of the upper-middle one.

    Uniform borders (the black or white padding of many exported films) are cut off first.
    """
    grey = _without_borders(grey)
    z = (grey - grey.mean()) / max(float(grey.std()), 1e-3)
    q = grey.shape[0] // 4
    return float(z[3 * q :, q : 3 * q].mean() - z[q : 2 * q, q : 3 * q].mean())


def _without_borders(grey: np.ndarray, flat: float = 0.02) -> np.ndarray:
    """``grey`` without the outer rows and columns that are uniform (std below ``flat``)."""
    rows = np.flatnonzero(grey.std(axis=1) >= flat)
    cols = np.flatnonzero(grey.std(axis=0) >= flat)
    if len(rows) < grey.shape[0] // 2 or len(cols) < grey.shape[1] // 2:
        return grey
    return grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def expects_chest_xrays(manifest: dict[str, Any]) -> bool:
    """Whether a checkpoint's inputs are chest X-rays, so the X-ray guard applies (not for face models)."""
    augment = manifest.get("config", {}).get("train", {}).get("augment")
    return manifest.get("kind") != FACE_KIND and augment != "face"
