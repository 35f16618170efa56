"""Does an image look like a chest X-ray? A cheap, explainable out-of-distribution guard.

A chest-X-ray classifier answers for any picture it is given, a face or a blank page included. Before its
findings are shown, seven named checks look at the image. Each measures one plain statistic and maps it
linearly onto a score in [0, 1] between a value typical of chest films (0) and one they do not reach (1);
the image is flagged when any score reaches 0.5, and the reasons name the checks that fired:

- ``colour``: the share of clearly coloured pixels. Radiographs are grey; a few have a coloured arrow.
- ``tones``: the entropy of the grey-level histogram. Blank, constant or mostly-black images have few tones.
- ``texture``: fine detail (mean absolute Laplacian) relative to contrast. Films are smooth at 128 px;
  photos of hair, fur, foliage or noise are not.
- ``layout``: a frontal chest film is brightest low in the middle (heart, diaphragm, abdomen) and darker
  above it (lungs); a portrait is brightest in the upper middle (the face) above darker clothes.
- ``shape``: films are close to square; panoramas and strips are not.
- ``midline``: how unevenly the brightness changes down the middle column. Down a film's spine and
  mediastinum it rises slowly; down a portrait it goes hair, face, eyes, mouth, chin, collar.
- ``structure``: the same texture measure at 16 px. Films always show anatomy at that scale; smooth
  shading (a gradient, a blur) shows none.

Measured on ../shared/data (``benchmarks/ood.py``): all 507 photos flagged in colour (499 LFW faces, 8
face-probes), and 505 of them made grey (99.6%), where colour cannot help: ``midline`` catches 95% of grey
faces, ``layout`` 82%, and each catches most of what the other misses. Of 2,670 grey non-X-rays in all
(those photos, scans of them, text pages, gradients, noise, shapes, patterns) 98.7% are flagged, and 3 of
344 real chest X-rays (0.9%: a phone photo of a monitor with a purple cast, a film shifted to the side, a
paper's figure with a score box burned into its middle). The ``midline`` and ``structure`` limits were set
looking at these films; re-set by the same rule without each X-ray source in turn, they flag 4 of the 344
(1.2%) and at least 98.2% of the grey photos (docs/reliability.md, "X-ray guard").
The statistics are computed on a 128 x 128 squash of the image: of every k-th row and column of a film of
1,024 px or more (:func:`thinned`, keeping at least 512), averaged in whole blocks first (:func:`block_means`);
``colour`` is measured on the small RGB copy the reader keeps of a file it made grey
(:attr:`medlens.data.readers.LoadedImage.colour`), so no file is decoded twice. Measured on the 344 films
(``benchmarks/ood.py``, 2026-12-03): a median 1.2-1.5 ms, at most 6.5 ms (films over about 1.5 megapixels,
where reading the decoded film's rows once costs that), with the same flags as the full-resolution squash gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from medlens.data.readers import LoadedImage, colour_sample
from medlens.data.transforms import resize_image

SIDE = 128
"""Statistics are computed on a SIDE x SIDE squash of the image."""

FLAG_AT = 0.5
COLOURED_CHROMA = 0.08
"""A pixel whose channels spread by more than this (of the full range) counts as coloured."""
HISTOGRAM_BINS = 32
COARSE_SIDE = 16
"""``structure`` is the texture measure on a COARSE_SIDE x COARSE_SIDE squash: anatomy, not noise."""
MIDLINE_BAND = 0.16
"""The midline column is this share of the width, centred on the brightest such band in the middle third."""
MIDLINE_STEPS = 16
"""The profile down the midline is taken in this many steps (8 px each at 128 px)."""
THIN_KEEP = 512
"""Films are thinned (:func:`thinned`) to no less than this many pixels on their short side: at 256 the
aliased noise of printed-and-scanned films trips ``texture`` (9 of 344 scans flagged, against 3)."""


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
        Check(
            "midline",
            0.2,
            0.4,
            "the brightness down its middle changes unevenly ({value:.2f}), not smoothly as down a chest film's "
            "spine and mediastinum",
        ),
        Check("structure", 0.25, 0.10, "it has almost no structure ({value:.2f}): smooth shading, not anatomy"),
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

    ``colour`` is a small RGB copy of the same image for the colour check, needed when ``pixels`` are already
    grey (:attr:`LoadedImage.colour`); ``None`` with grey pixels means the file held no colour.
    """
    height, width = pixels.shape[:2]
    pixels = thinned(pixels)
    if pixels.ndim == 3:
        colour = colour_sample(pixels) if colour is None else colour
        grey = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        grey = pixels
    small = resize_image(block_means(grey, 2 * SIDE), SIDE)
    inner = _without_borders(small)
    z = (inner - inner.mean()) / max(float(inner.std()), 1e-3)
    measures = {
        "colour": coloured_share(colour) if colour is not None else 0.0,
        "tones": _entropy(small),
        "texture": _texture(small),
        "layout": _layout(z),
        "shape": max(height, width) / max(min(height, width), 1),
        "midline": _midline(z),
        "structure": _texture(cv2.resize(inner, (COARSE_SIDE, COARSE_SIDE), interpolation=cv2.INTER_AREA)),
    }
    checks = {name: CHECKS[name].score(value) for name, value in measures.items()}
    reasons = [CHECKS[name].reason.format(value=measures[name]) for name, value in checks.items() if value >= FLAG_AT]
    score = max(checks.values())
    return OodResult(score >= FLAG_AT, score, checks, measures, reasons)


def assess_upload(loaded: LoadedImage) -> OodResult:
    """:func:`assess_xray` of a read image file, with the colour the reader kept where it made the file grey."""
    return assess_xray(loaded.pixels, loaded.colour)


def block_means(grey: np.ndarray, least: int) -> np.ndarray:
    """The means of k x k blocks of ``grey``, k the largest keeping ``least`` pixels on the short side (a last
    row or column short of a whole block is left out). OpenCV averages whole blocks several times faster
    than fractional ones, so the squash to :data:`SIDE` that follows averages the same pixels as a direct
    one for a fraction of its cost."""
    k = min(grey.shape) // least
    if k < 2:
        return grey
    rows, cols = grey.shape[0] // k, grey.shape[1] // k
    return cv2.resize(grey[: rows * k, : cols * k], (cols, rows), interpolation=cv2.INTER_AREA)


def thinned(pixels: np.ndarray, keep: int = THIN_KEEP) -> np.ndarray:
    """Every k-th row and column of an image whose short side is at least 2 x ``keep``, k keeping at least
    ``keep``: the squash to :data:`SIDE` still averages 16 or more pixels into each of its own, and costs a
    k-th of what the whole film would."""
    step = max(1, min(pixels.shape[:2]) // keep)
    return pixels[::step, ::step] if step > 1 else pixels


def coloured_share(rgb: np.ndarray) -> float:
    """The share of pixels whose R, G, B spread by more than :data:`COLOURED_CHROMA`."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # channel by channel: 20x faster than axis=2
    chroma = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return float(np.count_nonzero(chroma > COLOURED_CHROMA) / chroma.size)


def _entropy(grey: np.ndarray) -> float:
    # np.histogram's bins over [0, 1], counted directly: bin edges i / 32 are exact in binary, so are the bins.
    bins = (grey * HISTOGRAM_BINS).astype(np.intp)
    counts = np.bincount(np.minimum(bins, HISTOGRAM_BINS - 1, out=bins).ravel(), minlength=HISTOGRAM_BINS)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: never -0.0


def _texture(grey: np.ndarray) -> float:
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(np.abs(laplacian).mean() / max(float(grey.std()), 1e-3))


def _layout(z: np.ndarray) -> float:
    """Mean of standardised brightness ``z`` over the lower-middle quarter minus that over the upper-middle one."""
    q = z.shape[0] // 4
    return float(z[3 * q :, q : 3 * q].mean() - z[q : 2 * q, q : 3 * q].mean())


def _midline(z: np.ndarray) -> float:
    """How unevenly standardised brightness ``z`` changes down the image's midline: the mean absolute second
    difference of its profile in :data:`MIDLINE_STEPS` steps.

    The midline is the brightest column band (:data:`MIDLINE_BAND` of the width) at lung height within the
    middle third, so a film shifted sideways keeps its spine. Down a frontal film it runs neck, mediastinum,
    heart, diaphragm, abdomen: a slow rise. Down a portrait it runs hair, forehead, eyes, nose, mouth, chin,
    collar; down a page, line after line of text.
    """
    height, width = z.shape
    band = max(int(MIDLINE_BAND * width), 1)
    at_lungs = z[int(0.2 * height) : int(0.65 * height)].mean(axis=0)
    smooth = np.convolve(at_lungs, np.ones(band) / band, mode="same")
    first, last = int(width / 3), int(2 * width / 3)
    centre = first + int(np.argmax(smooth[first:last]))
    column = z[:, max(centre - band // 2, 0) : centre + band // 2 + 1].mean(axis=1, dtype=np.float32)
    profile = cv2.resize(column[:, None], (1, MIDLINE_STEPS), interpolation=cv2.INTER_AREA).ravel()
    return float(np.abs(np.diff(profile, 2)).mean())


def _without_borders(grey: np.ndarray, flat: float = 0.02) -> np.ndarray:
    """``grey`` without the outer rows and columns that are uniform (std below ``flat``): the black or white
    padding of many exported films."""
    rows = np.flatnonzero(grey.std(axis=1) >= flat)
    cols = np.flatnonzero(grey.std(axis=0) >= flat)
    if len(rows) < grey.shape[0] // 2 or len(cols) < grey.shape[1] // 2:
        return grey
    return grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

