"""The chest-X-ray guard: synthetic non-X-rays flagged, and its rates on the real images in ../shared/data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.data.readers import load_image
from medlens.ood import CHECKS, assess_xray, colour_sample

SUFFIXES = {".png", ".jpg", ".jpeg"}


def _flagged(path: Path) -> bool:
    data = path.read_bytes()
    return assess_xray(load_image(data).pixels, colour_sample(data)).flag


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((300, 300), np.float32),
        np.full((512, 400), 0.6, np.float32),
        np.random.default_rng(0).random((240, 320, 3), dtype=np.float32),
        np.random.default_rng(1).random((256, 256), dtype=np.float32),
        np.tile(np.linspace(0, 1, 600, dtype=np.float32), (150, 1)),
    ],
    ids=["black", "blank", "random-colour", "random-grey", "strip"],
)
def test_synthetic_non_xrays_are_flagged(pixels):
    result = assess_xray(pixels)
    assert result.flag and result.score >= 0.5 and result.reasons
    assert set(result.checks) == set(CHECKS) and all(0.0 <= s <= 1.0 for s in result.checks.values())


def test_colour_sample_only_for_colour_files():
    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    assert colour_sample(png(np.zeros((40, 40), np.uint8))) is None
    assert colour_sample(b"DICM, or anything else") is None
    sample = colour_sample(png(np.full((400, 300, 3), (200, 30, 30), np.uint8)))
    assert sample is not None and max(sample.shape[:2]) == 128 and sample.dtype == np.float32
    result = assess_xray(np.full((400, 300), 0.4, np.float32), sample)
    assert result.checks["colour"] == 1.0 and result.measures["colour"] == 1.0


@pytest.mark.shared
@pytest.mark.slow
def test_rates_on_real_images(shared_data):
    photos = _images(shared_data / "face-probes") + _images(shared_data / "faces-lfw15")
    xrays = _images(shared_data / "cxr4") + _images(shared_data / "nih14" / "images")
    assert len(photos) >= 500 and len(xrays) >= 340
    photo_rate = np.mean([_flagged(p) for p in photos])
    xray_rate = np.mean([_flagged(p) for p in xrays])
    assert photo_rate >= 0.95, f"only {photo_rate:.1%} of {len(photos)} photos flagged"
    assert xray_rate <= 0.05, f"{xray_rate:.1%} of {len(xrays)} real chest X-rays flagged"
