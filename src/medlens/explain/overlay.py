"""Heatmaps laid over the original image: a plain PNG for the server, a captioned figure for people.

The map is stretched back to the original resolution first (the model saw a squash-resize of the whole
image), so the overlay has the original's pixels and aspect ratio. matplotlib is imported lazily (its
colour map, and an Agg canvas for the figure), so nothing here needs a screen.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from medlens.data.transforms import resize_map
from medlens.io import write_atomic

COLORMAP = "jet"
FIGURE_DPI = 100
MIN_FIGURE_SIDE = 256
"""Images smaller than this are enlarged by a whole factor in the figure, so the caption fits."""
CAPTION_PX = 30
COLORBAR_PX = 90
PNG_LEVEL = 1
"""zlib level of heatmap PNGs: level 1 encodes a 1024 px overlay several times faster than PIL's default 6
for ~20% more bytes (an explained film's captioned figure: 0.21 s instead of 0.47)."""


def blend(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """``heatmap`` in jet colours over ``image`` (float [0, 1], H0 x W0 or H0 x W0 x 3): uint8 H0 x W0 x 3."""
    import matplotlib

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected an H x W or H x W x 3 image, got shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.clip(resize_map(heatmap, image.shape), 0.0, 1.0)
    colours = matplotlib.colormaps[COLORMAP](heat)[..., :3]
    base = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    mixed = (1.0 - alpha) * np.clip(base, 0.0, 1.0) + alpha * colours
    return np.rint(mixed * 255.0).astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> bytes:
    """The overlay alone as PNG bytes, exactly the original image's size: what the server returns."""
    buffer = io.BytesIO()
    Image.fromarray(blend(image, heatmap, alpha)).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def heatmap_png(heatmap: np.ndarray, backdrop: np.ndarray, marks: np.ndarray | None = None) -> bytes:
    """A heatmap as a picture: a CAM (no ``marks``) in jet colours over ``backdrop`` (float [0, 1], its size);
    an occlusion map over a face's aligned chip, enlarged, with its landmarks marked."""
    if marks is None:
        return overlay_png(backdrop, heatmap)
    from medlens.explain.occlusion import explanation_image, png_bytes

    chip = np.rint(np.clip(backdrop, 0.0, 1.0) * 255.0).astype(np.uint8)
    return png_bytes(explanation_image(chip, heatmap, marks))


def overlay_figure(
    image: np.ndarray,
    heatmap: np.ndarray,
    caption: str,
    path: str | Path | None = None,
    alpha: float = 0.4,
) -> bytes:
    """The overlay with a colour bar and ``caption`` above it, as PNG bytes (also written to ``path``).

    The image keeps its own pixels one to one (small images are enlarged by a whole factor).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    scale = max(1, math.ceil(MIN_FIGURE_SIDE / max(height, width)))
    shown_w, shown_h = width * scale, height * scale
    fig_w, fig_h = shown_w + COLORBAR_PX, shown_h + CAPTION_PX
    fig = Figure(figsize=(fig_w / FIGURE_DPI, fig_h / FIGURE_DPI), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, shown_w / fig_w, shown_h / fig_h))
    ax.imshow(blend(image, heatmap, alpha), interpolation="nearest")
    ax.set_axis_off()
    bar = fig.add_axes((
        (shown_w + 12) / fig_w, 0.1 * shown_h / fig_h, 14 / fig_w, 0.8 * shown_h / fig_h
    ))
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), COLORMAP), cax=bar, label="relevance")
    fig.text(4 / fig_w, 1 - 6 / fig_h, caption, va="top", ha="left", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, pil_kwargs={"compress_level": PNG_LEVEL})
    data = buffer.getvalue()
    if path is not None:
        write_atomic(path, data)
    return data
