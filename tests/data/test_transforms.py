"""Preprocessing options on synthetic images: contrast, border crop, and one path for cache and the loaded model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medlens.config import load_config
from medlens.data.cache import build_cache
from medlens.data.readers import read_image
from medlens.data.transforms import crop_border_of, enhance_contrast, prepare_image, resize_image
from medlens.errors import ConfigError


def _low_contrast(seed: int = 0, side: int = 128) -> np.ndarray:
    """A grey ramp squeezed into 100..140 plus a little noise: a washed-out film."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(100, 140, side)[None, :] + rng.normal(0, 2, (side, side))
    return np.clip(ramp, 0, 255).astype(np.uint8)


def _burned_in(side: int = 120, margin: int = 12) -> np.ndarray:
    """Mid-grey 'anatomy' inside a black frame that carries white letters and an arrow, as exported films do."""
    rng = np.random.default_rng(1)
    image = np.zeros((side, side), np.float32)
    image[margin:-margin, margin:-margin] = 0.3 + 0.4 * rng.random((side - 2 * margin, side - 2 * margin))
    image[3:8, 10:30] = 1.0  # a text label in the top margin
    image[side - 9 : side - 4, 70:100] = 1.0  # another at the bottom
    image[40:44, 2:9] = 1.0  # an arrow in the left margin
    return image


def test_histeq_flattens_the_histogram():
    image = _low_contrast()
    equalised = enhance_contrast(image, "histeq")
    assert equalised.dtype == np.uint8 and equalised.shape == image.shape
    assert equalised.min() <= 5 and equalised.max() >= 250  # stretched to the full range
    counts = np.histogram(equalised, bins=8, range=(0, 256))[0]
    assert counts.max() / counts.min() < 1.6  # close to uniform, unlike the input's 3 busy bins
    assert np.count_nonzero(np.histogram(image, bins=8, range=(0, 256))[0]) <= 3


def test_clahe_is_bounded_by_its_clip_limit():
    image = _low_contrast()
    clahe, histeq = enhance_contrast(image, "clahe"), enhance_contrast(image, "histeq")
    assert clahe.dtype == np.uint8 and clahe.shape == image.shape
    # Contrast goes up, but the clip limit keeps it well short of global equalisation's full stretch.
    assert image.std() < clahe.std() < histeq.std()
    flat = np.full((64, 64), 120, np.uint8)
    assert np.abs(enhance_contrast(flat, "clahe").astype(int) - 120).max() <= 8  # no noise invented


def test_colour_images_are_equalised_on_their_luma():
    grey = _low_contrast()
    colour = np.dstack([grey, grey, grey])
    out = enhance_contrast(colour, "histeq")
    assert out.shape == colour.shape
    assert np.abs(out[..., 0].astype(int) - out[..., 2].astype(int)).max() <= 2  # grey stays grey


def test_auto_crop_removes_a_burned_in_border():
    image = _burned_in()
    cropped = crop_border_of(image, "auto")
    assert cropped.shape == (96, 96)
    assert cropped.max() < 0.75 and cropped.min() >= 0.3  # no letters, no frame left


def test_auto_crop_keeps_an_image_without_border_and_is_capped():
    rng = np.random.default_rng(2)
    plain = 0.3 + 0.4 * rng.random((80, 100)).astype(np.float32)
    assert crop_border_of(plain, "auto").shape == (80, 100)
    black = np.zeros((100, 100), np.float32)
    assert crop_border_of(black, "auto").shape == (60, 60)  # at most 20% from each side


def test_fraction_crop_takes_that_share_of_each_side():
    image = np.arange(100 * 200, dtype=np.float32).reshape(100, 200) / (100 * 200)
    cropped = crop_border_of(image, 0.1)
    assert cropped.shape == (80, 160)
    assert cropped[0, 0] == image[10, 20]
    with pytest.raises(ValueError, match="crop_border"):
        crop_border_of(image, 0.5)


def test_prepare_image_defaults_to_the_plain_quantised_squash():
    rng = np.random.default_rng(3)
    pixels = rng.random((90, 70)).astype(np.float32)
    expected = np.rint(resize_image(pixels, 32) * 255.0).astype(np.uint8)
    assert np.array_equal(prepare_image(pixels, 32), expected)
    with pytest.raises(ValueError, match="histeq"):
        prepare_image(pixels, 32, contrast="gamma")


def test_config_checks_the_options():
    config = load_config(None, ["data.contrast=clahe", "data.crop_border=auto"])
    assert config.data.contrast == "clahe" and config.data.crop_border == "auto"
    assert load_config(None, ["data.crop_border=0.05"]).data.crop_border == 0.05
    with pytest.raises(ConfigError, match="clahe"):
        load_config(None, ["data.contrast=gamma"])
    with pytest.raises(ConfigError, match="auto"):
        load_config(None, ["data.crop_border=0.6"])


def test_cache_applies_the_options_and_refuses_other_ones(tmp_path):
    path = tmp_path / "film.png"
    Image.fromarray(np.rint(_burned_in() * 255).astype(np.uint8)).save(path)
    options = {"contrast": "clahe", "crop_border": "auto"}
    cache = build_cache([path], tmp_path / "cache", size=48, workers=1, progress=False, **options)
    assert np.array_equal(cache[0], prepare_image(read_image(path), 48, **options))
    with pytest.raises(ValueError, match="contrast"):
        build_cache([path], tmp_path / "cache", size=48, workers=1, progress=False, contrast="histeq")
    with pytest.raises(ValueError, match="crop_border"):
        build_cache([path], tmp_path / "cache", size=48, workers=1, progress=False, contrast="clahe")
