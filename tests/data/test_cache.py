"""The preprocessing cache: faithful to resize_image, parallel = serial, resumable, never mixed up."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.data import cache as cache_module
from medlens.data.cache import ImageCache, build_cache
from medlens.data.readers import read_image
from medlens.data.transforms import resize_image

SIZE = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """20 small images of varied sizes and modes, one smaller than the cache size (enlarged)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        height, width = (20, 24) if i == 7 else (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        gradient = np.linspace(0, 255, width)[None, :] * np.ones((height, 1))
        pixels = np.clip(gradient + rng.normal(0, 30, (height, width)), 0, 255).astype(np.uint8)
        image = (
            Image.fromarray(np.dstack([pixels, pixels[::-1], 255 - pixels])) if i % 5 == 0 else Image.fromarray(pixels)
        )
        path = folder / f"img{i:02d}.{'jpg' if i % 6 == 1 else 'png'}"
        image.save(path)
        paths.append(path)
    return paths


def _chunks_done(out: Path) -> np.ndarray:
    return np.load(out / "done.npy")


def test_resize_image_squashes_to_a_float32_square():
    pixels = np.random.default_rng(0).random((120, 80), dtype=np.float32)
    assert resize_image(pixels, 32).shape == (32, 32)
    colour = resize_image(np.dstack([pixels] * 3), 200)
    assert colour.shape == (200, 200, 3) and colour.dtype == np.float32
    assert colour.min() >= 0 and colour.max() <= 1
    flat = np.full((64, 64), 0.25, dtype=np.float32)
    assert np.allclose(resize_image(flat, 16), 0.25)
    with pytest.raises(ValueError, match=re.escape("shape (4, 4, 2)")):
        resize_image(np.zeros((4, 4, 2), np.float32), 8)
    with pytest.raises(ValueError, match="not 0"):
        resize_image(flat, 0)


def test_cache_round_trips_every_image_within_rounding(tmp_path, images):
    cache = build_cache(images, tmp_path / "cache", size=SIZE, workers=1, progress=False)
    assert len(cache) == len(images) and cache.size == SIZE and cache.channels == 1
    assert cache.paths == [str(p) for p in images]
    assert (cache.status == "ok").all()
    for i, path in enumerate(images):
        expected = resize_image(read_image(path), SIZE)
        assert cache[i].dtype == np.uint8 and cache[i].shape == (SIZE, SIZE)
        assert np.abs(cache[i] / 255.0 - expected).max() <= 1 / 255 + 1e-6
        assert np.abs(cache.get_float(i) - expected).max() <= 1 / 255 + 1e-6
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert {"version", "size", "channels", "n", "created"} <= set(meta) and meta["n"] == len(images)
    assert not (tmp_path / "cache" / "progress.jsonl").exists()


def test_three_channel_cache_keeps_colour(tmp_path, images):
    cache = build_cache(images[:6], tmp_path / "rgb", size=SIZE, channels=3, workers=1, progress=False)
    assert cache.images.shape == (6, SIZE, SIZE, 3)
    expected = resize_image(read_image(images[0], channels=3), SIZE)
    assert np.abs(cache.get_float(0) - expected).max() <= 1 / 255 + 1e-6


def test_two_workers_give_the_same_cache_as_one(tmp_path, images):
    build_cache(images, tmp_path / "one", size=SIZE, workers=1, progress=False)
    build_cache(images, tmp_path / "two", size=SIZE, workers=2, progress=False)
    for name in ("images.u8", "index.csv", "done.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_an_interrupted_build_resumes_with_only_its_unfinished_chunks(tmp_path, images, monkeypatch):
    clean = tmp_path / "clean"
    build_cache(images, clean, size=SIZE, workers=1, progress=False)
    out = tmp_path / "interrupted"
    real_chunk = cache_module._cache_chunk
    calls: list[int] = []

    def crash_after_three(job):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job.chunk)
        return real_chunk(job)

    monkeypatch.setattr(cache_module, "_cache_chunk", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_cache(images, out, size=SIZE, workers=1, progress=False)
    assert _chunks_done(out).sum() == 3
    with pytest.raises(ValueError, match="not a finished image cache"):
        ImageCache(out)

    redone: list[int] = []
    monkeypatch.setattr(cache_module, "_cache_chunk", lambda job: redone.append(job.chunk) or real_chunk(job))
    build_cache(images, out, size=SIZE, workers=1, progress=False)
    assert sorted(redone) == sorted(set(range(len(_chunks_done(out)))) - set(calls))
    for name in ("images.u8", "index.csv", "done.npy"):
        assert (clean / name).read_bytes() == (out / name).read_bytes(), name


def test_cleared_chunks_of_a_finished_cache_are_redone_and_nothing_else(tmp_path, images, monkeypatch):
    out = tmp_path / "cache"
    build_cache(images, out, size=SIZE, workers=1, progress=False)
    before = (out / "images.u8").read_bytes()
    done = _chunks_done(out)
    chunk_size = json.loads((out / "cache.json").read_text())["chunk_size"]
    done[[1, 4]] = False
    np.save(out / "done.npy", done)
    rows = np.memmap(out / "images.u8", dtype=np.uint8, mode="r+", shape=(len(images), SIZE, SIZE))
    rows[chunk_size : 2 * chunk_size] = 0
    rows[4 * chunk_size : 5 * chunk_size] = 0
    rows.flush()
    del rows

    real_chunk = cache_module._cache_chunk
    redone: list[int] = []
    monkeypatch.setattr(cache_module, "_cache_chunk", lambda job: redone.append(job.chunk) or real_chunk(job))
    build_cache(images, out, size=SIZE, workers=1, progress=False)
    assert sorted(redone) == [1, 4]
    assert (out / "images.u8").read_bytes() == before


def test_a_finished_cache_is_returned_without_decoding_anything(tmp_path, images, monkeypatch):
    build_cache(images, tmp_path, size=SIZE, workers=1, progress=False)

    def must_not_run(job):
        raise AssertionError("a finished cache was rebuilt")

    monkeypatch.setattr(cache_module, "_cache_chunk", must_not_run)
    assert len(build_cache([str(p) for p in images], tmp_path, size=SIZE, progress=False)) == len(images)


def test_unreadable_images_are_zero_filled_marked_and_counted(tmp_path, images, caplog):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a PNG at all")
    missing = tmp_path / "missing.png"
    paths = [images[0], garbage, images[1], missing]
    with caplog.at_level(logging.WARNING, logger="medlens.data.cache"):
        cache = build_cache(paths, tmp_path / "cache", size=SIZE, workers=1, progress=False)
    assert list(cache.status) == ["ok", "unreadable", "ok", "unreadable"]
    assert "not a PNG, JPEG or DICOM" in cache.errors[1] and "no such file" in cache.errors[3]
    assert not cache[1].any() and not cache[3].any() and cache[0].any()
    assert "2 of 4 images were unreadable" in caplog.text


def test_a_cache_of_other_images_or_size_is_never_overwritten(tmp_path, images):
    out = tmp_path / "cache"
    build_cache(images[:8], out, size=SIZE, workers=1, progress=False)
    before = (out / "images.u8").read_bytes()
    with pytest.raises(ValueError, match="size=32, not the requested size=48"):
        build_cache(images[:8], out, size=48, progress=False)
    with pytest.raises(ValueError, match="channels=1, not the requested channels=3"):
        build_cache(images[:8], out, size=SIZE, channels=3, progress=False)
    with pytest.raises(ValueError, match="8 images, not the requested 9"):
        build_cache(images[:9], out, size=SIZE, progress=False)
    swapped = [images[1], images[0], *images[2:8]]
    with pytest.raises(ValueError, match=re.escape(f"image 0 is {str(images[0])!r}, not the requested")):
        build_cache(swapped, out, size=SIZE, progress=False)
    assert (out / "images.u8").read_bytes() == before


def test_indices_of_finds_rows_and_names_a_missing_path(tmp_path, images):
    cache = build_cache(images[:5], tmp_path, size=SIZE, workers=1, progress=False)
    assert cache.indices_of([images[3], str(images[0])]).tolist() == [3, 0]
    with pytest.raises(KeyError, match=r"nowhere\.png"):
        cache.indices_of(["nowhere.png"])


def test_opening_a_folder_that_is_no_cache_says_how_to_build_one(tmp_path):
    with pytest.raises(ValueError, match=re.escape("medlens data cache SOURCE --size N --out DIR")):
        ImageCache(tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [({"size": 0}, "not 0"), ({"channels": 2}, "not 2")])
def test_bad_arguments_name_the_value(tmp_path, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_cache(images, tmp_path, progress=False, **kwargs)


@pytest.mark.shared
def test_real_nih_images_cache_at_full_fidelity(tmp_path, shared_data):
    folder = shared_data / "nih14" / "images"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: real-image test skipped")
    paths = sorted(folder.glob("*.png"))[:16]
    cache = build_cache(paths, tmp_path, size=64, workers=2, progress=False)
    assert (cache.status == "ok").all()
    for i in (0, 7, 15):
        expected = resize_image(read_image(paths[i]), 64)
        assert np.abs(cache.get_float(i) - expected).max() <= 1 / 255 + 1e-6
    assert cache.images.std() > 20  # real radiographs, not zero-filled rows
