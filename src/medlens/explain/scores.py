"""How well a heatmap points at the truth: the pointing game and the energy inside boxes or masks.

Everything is compared at the original image's resolution, where NIH boxes (``BBox_List_2017.csv``,
pixels of the original image) and phantom masks live: the model-size map is stretched back over the
image (:func:`medlens.data.transforms.resize_map`), never the boxes shrunk onto the map. A pixel belongs to a
box ``x, y, w, h`` when its centre ``(col + 0.5, row + 0.5)`` lies in ``[x, x + w) x [y, y + h)``.

- pointing game (Zhang et al., 2016): a hit when the map's maximum lies inside the region, or within
  ``tolerance`` pixels of it (they allow 15 px at 224 px).
- energy: the fraction of the map's total inside the region (0 for an all-zero map).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from medlens.data.transforms import resize_map
from medlens.errors import ConfigError, DataSourceError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Localization:
    """One map against one region."""

    hit: bool
    energy: float
    peak: tuple[int, int]
    """(row, col) of the map's maximum, in original-image pixels."""


@dataclass(frozen=True)
class FindingScore:
    """The localisation of one finding's map on one image."""

    image: str
    finding: str
    probability: float
    hit: bool
    energy: float


def box_region(boxes: Iterable[Box], shape: tuple[int, ...]) -> np.ndarray:
    """Boolean (H0, W0) mask of the union of ``x, y, w, h`` boxes in original-image pixels."""
    height, width = shape[:2]
    rows = np.arange(height) + 0.5
    cols = np.arange(width) + 0.5
    region = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        if w <= 0 or h <= 0:
            raise DataSourceError(f"a box needs a positive width and height, got x={x} y={y} w={w} h={h}")
        region |= ((rows >= y) & (rows < y + h))[:, None] & ((cols >= x) & (cols < x + w))[None, :]
    return region


def localize(heatmap: np.ndarray, region: np.ndarray, tolerance: float = 0.0) -> Localization:
    """Pointing game and energy of ``heatmap`` (any size, stretched to the region's) inside ``region``."""
    if region.ndim != 2 or not region.any():
        raise ValueError(f"region must be a non-empty 2-D mask, got shape {region.shape} with {region.sum()} pixels")
    if tolerance < 0:
        raise ConfigError(f"the pointing-game tolerance must be a distance in pixels >= 0, got {tolerance}")
    heat = np.clip(resize_map(heatmap, region.shape), 0.0, None)
    total = float(heat.sum())
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if total <= 0.0:
        return Localization(hit=False, energy=0.0, peak=(int(row), int(col)))
    hit = bool(region[row, col])
    if not hit and tolerance > 0:
        inside = np.argwhere(region)
        hit = bool(np.min(np.hypot(inside[:, 0] - row, inside[:, 1] - col)) <= tolerance)
    return Localization(hit=hit, energy=float(heat[region].sum()) / total, peak=(int(row), int(col)))


def summarize(scores: Sequence[FindingScore]) -> dict[str, dict[str, float]]:
    """Per finding, then ``"all"``: ``n`` maps, ``pointing`` (hit rate) and mean ``energy`` inside."""
    groups: dict[str, list[FindingScore]] = {}
    for score in scores:
        groups.setdefault(score.finding, []).append(score)
    summary = {finding: _stats(group) for finding, group in sorted(groups.items())}
    if scores:
        summary["all"] = _stats(scores)
    return summary


def _stats(scores: Sequence[FindingScore]) -> dict[str, float]:
    return {
        "n": len(scores),
        "pointing": float(np.mean([s.hit for s in scores])),
        "energy": float(np.mean([s.energy for s in scores])),
    }
