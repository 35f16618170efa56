"""The chest-X-ray guard: synthetic non-X-rays flagged, every flag's reason, and its rates on the real images
in ../shared/data (benchmarks/ood.py measures more kinds of picture, and the cost)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from medlens.data.readers import load_image
from medlens.ood import CHECKS, FLAG_AT, assess_upload, assess_xray, thinned

SUFFIXES = {".png", ".jpg", ".jpeg"}


def _flagged(data: bytes) -> bool:
    return assess_upload(load_image(data)).flag


def _grey_jpeg(path: Path) -> bytes:
    """The photo made grey and saved as a user would upload it."""
    buffer = io.BytesIO()
    Image.open(path).convert("L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def _strip() -> np.ndarray:
    return np.tile(np.linspace(0, 1, 600, dtype=np.float32), (150, 1))


def _bright_below() -> np.ndarray:
    """A smooth gradient, brighter downwards as a film is: its layout passes, but it shows no structure."""
    return np.tile(np.linspace(0.2, 0.9, 400, dtype=np.float32)[:, None], (1, 400))


def _bands() -> np.ndarray:
    """Four soft horizontal bands, light and dark: smooth, but nothing like the slow rise down a film's middle."""
    rows = np.linspace(0, 1, 400, dtype=np.float32)[:, None]
    return np.tile(0.5 + 0.35 * np.sin(2 * np.pi * 4 * rows), (1, 400))


def _portrait() -> np.ndarray:
    """A smooth sketch of a portrait: a bright face with dark eyes and mouth above dark clothes."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 256
    pixels = np.full((256, 256), 0.45, np.float32)
    pixels[((xx - 0.5) / 0.2) ** 2 + ((yy - 0.4) / 0.27) ** 2 < 1] = 0.85
    for cx in (0.42, 0.58):
        pixels[((xx - cx) / 0.04) ** 2 + ((yy - 0.35) / 0.02) ** 2 < 1] = 0.1
    pixels[(abs(xx - 0.5) < 0.07) & (abs(yy - 0.52) < 0.015)] = 0.2
    pixels[yy > 0.72] = 0.12
    return pixels


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((300, 300), np.float32),
        np.full((512, 400), 0.6, np.float32),
        np.random.default_rng(0).random((240, 320, 3), dtype=np.float32),
        np.random.default_rng(1).random((256, 256), dtype=np.float32),
        _strip(),
        _bright_below(),
        _bands(),
        _portrait(),
    ],
    ids=["black", "blank", "random-colour", "random-grey", "strip", "bright-below", "bands", "portrait"],
)
def test_synthetic_non_xrays_are_flagged(pixels):
    result = assess_xray(pixels)
    assert result.flag and result.score >= 0.5 and result.reasons
    assert set(result.checks) == set(CHECKS) and all(0.0 <= s <= 1.0 for s in result.checks.values())


def test_every_flag_names_the_checks_that_fired():
    images = {
        "colour": np.full((300, 300, 3), (0.8, 0.1, 0.1), np.float32),
        "tones": np.full((300, 300), 0.5, np.float32),
        "texture": np.random.default_rng(2).random((300, 300), dtype=np.float32),
        "layout": _portrait(),
        "shape": _strip(),
        "midline": _bands(),
        "structure": _bright_below(),
    }
    assert set(images) == set(CHECKS), "an image for every check"
    for name, pixels in images.items():
        result = assess_xray(pixels)
        fired = [n for n, score in result.checks.items() if score >= FLAG_AT]
        assert name in fired and result.flag == bool(fired)
        assert result.reasons == [CHECKS[n].reason.format(value=result.measures[n]) for n in fired]


def test_a_grey_read_keeps_a_small_colour_copy_of_colour_files():
    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    assert load_image(png(np.zeros((40, 40), np.uint8))).colour is None
    red = png(np.full((4000, 300, 3), (200, 30, 30), np.uint8))
    assert load_image(red, channels=3).colour is None  # the pixels keep their colour themselves
    loaded = load_image(red)
    assert loaded.pixels.ndim == 2 and loaded.colour is not None
    assert 128**2 <= loaded.colour.shape[0] * loaded.colour.shape[1] <= 2 * 128**2 and loaded.colour.dtype == np.float32
    assert np.allclose(loaded.colour, (200 / 255, 30 / 255, 30 / 255), atol=1e-6)
    result = assess_upload(loaded)
    assert result.checks["colour"] == 1.0 and result.measures["colour"] == 1.0 and result.measures["shape"] > 13


def test_a_large_film_is_thinned_and_scores_as_its_downsized_copy():
    rows, cols = np.mgrid[0:4096, 0:3072].astype(np.float32)
    film = 0.5 + 0.3 * np.sin(cols / 300) * np.cos(rows / 450) + 0.05 * np.sin(cols / 37 + rows / 53)
    assert thinned(film).shape == (683, 512) and thinned(film[:1023]).shape == (1023, 3072)
    large, downsized = assess_xray(film), assess_xray(cv2.resize(film, (1024, 1365), interpolation=cv2.INTER_AREA))
    assert large.measures["shape"] == 4096 / 3072  # of the film, not of its thinned copy
    for name in ("tones", "texture", "layout", "midline", "structure"):
        assert abs(large.measures[name] - downsized.measures[name]) <= 0.02 + 0.02 * abs(downsized.measures[name])


@pytest.mark.shared
@pytest.mark.slow
def test_rates_on_real_images(shared_data):
    """The issue's goals: >= 98% of the photos flagged in colour and made grey, <= 1% of the real films."""
    photos = _images(shared_data / "face-probes") + _images(shared_data / "faces-lfw15")
    xrays = _images(shared_data / "cxr4") + _images(shared_data / "nih14" / "images")
    assert len(photos) >= 500 and len(xrays) >= 340
    colour_rate = np.mean([_flagged(p.read_bytes()) for p in photos])
    grey_rate = np.mean([_flagged(_grey_jpeg(p)) for p in photos])
    xray_rate = np.mean([_flagged(p.read_bytes()) for p in xrays])
    assert colour_rate >= 0.98, f"only {colour_rate:.1%} of {len(photos)} colour photos flagged"
    assert grey_rate >= 0.98, f"only {grey_rate:.1%} of {len(photos)} photos made grey flagged"
    assert xray_rate <= 0.01, f"{xray_rate:.1%} of {len(xrays)} real chest X-rays flagged"
