"""The pixel baseline of ``medlens evaluate``: fitted on the run's own training split, scored on the same images.

It reads each training image once at :data:`~medlens.evaluation.baseline.BASELINE_SIZE` pixels: from the
run's preprocessing cache where the image is in it (shrunk from the cached size), else decoded and
prepared as the model's images are (same crop, resize and contrast). More than
:data:`MAX_TRAINING_IMAGES` training images are subsampled (seeded). Where the training split cannot be
had (no splits.csv beside the checkpoint, the training images on another machine), the baseline is omitted
and metrics.json says why in one line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlens.data.cache import ImageCache
from medlens.data.readers import read_image
from medlens.data.records import RecordTable, load_source
from medlens.data.splits import read_splits
from medlens.data.transforms import prepare_image, resize_image
from medlens.errors import MedlensError
from medlens.evaluation.baseline import BASELINE_SIZE, PixelBaseline, baseline_aucs, compare_with_model
from medlens.runs import CACHE_DIR, SPLITS_FILE, run_folder_of

log = logging.getLogger(__name__)

MAX_TRAINING_IMAGES = 10_000
SEED = 0
NO_OPTIONS = {"contrast": "none", "crop_border": 0.0, "resize": "squash"}
"""The preprocessing options of a cache or manifest that records none."""


class BaselineUnavailable(MedlensError):
    """The run's training images cannot be read here: the baseline is omitted, the evaluation goes on."""


def pixel_baseline(
    checkpoint: Path | None, manifest: Mapping[str, Any], evaluated: RecordTable, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """metrics.json's ``baseline``: fitted on the run's training split, scored on ``evaluated``; or
    ``{"omitted": reason}`` where the training split is not to be had."""
    started = time.perf_counter()
    try:
        training = training_split(checkpoint, manifest, list(metrics["labels"]))
        pixels = BaselinePixels(manifest, run_folder_of(checkpoint))
        train_x, train_rows = pixels.of(training.paths)
        if len(train_rows) == 0:
            raise BaselineUnavailable(f"none of the {len(training)} training images could be read")
        eval_x, eval_rows = pixels.of(evaluated.paths)
        if len(eval_rows) < len(evaluated):
            raise BaselineUnavailable(f"{len(evaluated) - len(eval_rows)} evaluated images could not be re-read")
    except BaselineUnavailable as exc:
        log.warning("no pixel baseline: %s", exc)
        return {"omitted": str(exc)}
    model = PixelBaseline(metrics["task"]).fit(train_x, training.labels[train_rows])
    found = compare_with_model(metrics, baseline_aucs(model, eval_x, evaluated.labels), len(train_rows))
    log.info("pixel baseline on %d training images in %.1f s", len(train_rows), time.perf_counter() - started)
    return found


def training_split(checkpoint: Path | None, manifest: Mapping[str, Any], labels: Sequence[str]) -> RecordTable:
    """The run's training images (subsampled past MAX_TRAINING_IMAGES), relabelled to the model's labels."""
    run_dir = run_folder_of(checkpoint)
    splits_file = run_dir / SPLITS_FILE if run_dir is not None else None
    if splits_file is None or not splits_file.exists():
        raise BaselineUnavailable(f"no {SPLITS_FILE} beside the checkpoint, so no training split to fit it on")
    data = manifest.get("data") or {}
    source = Path(data.get("source", ""))
    if not source.exists():
        raise BaselineUnavailable(f"the training images ({source}) are not on this machine")
    table = load_source(source, data.get("kind"))
    rows = read_splits(splits_file, table).get("train", np.empty(0, dtype=np.int64))
    if len(rows) == 0:
        raise BaselineUnavailable(f"none of the training images {SPLITS_FILE} lists is in {source}")
    if len(rows) > MAX_TRAINING_IMAGES:
        rows = np.sort(np.random.default_rng(SEED).choice(rows, MAX_TRAINING_IMAGES, replace=False))
    return table.subset(rows).relabel(labels)


class BaselinePixels:
    """Images at the baseline's size as the model's preprocessing prepares them, from the run's cache if it
    holds them."""

    def __init__(self, manifest: Mapping[str, Any], run_dir: Path | None):
        prep = manifest.get("preprocessing") or {}
        config = manifest.get("config") or {}
        self.channels = int(prep.get("channels", (config.get("data") or {}).get("channels", 1)))
        self.options = {key: prep.get(key, default) for key, default in NO_OPTIONS.items()}
        self.cache = _open_cache(config, run_dir, self.channels, self.options)

    def of(self, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        """(images, rows): the uint8 images of the readable ``paths`` and which of them they are."""
        images, rows = [], []
        for i, path in enumerate(paths):
            image = self._one(path)
            if image is not None:
                images.append(image)
                rows.append(i)
        shape = (0, BASELINE_SIZE, BASELINE_SIZE) + ((3,) if self.channels == 3 else ())
        stacked = np.stack(images) if images else np.empty(shape, dtype=np.uint8)
        return stacked, np.asarray(rows, dtype=np.int64)

    def _one(self, path: Path) -> np.ndarray | None:
        cached = self.cache.get(os.path.abspath(path)) if self.cache else None
        if cached is not None:
            return np.rint(resize_image(cached, BASELINE_SIZE) * 255.0).astype(np.uint8)
        try:
            pixels = read_image(path, channels=self.channels)  # type: ignore[arg-type]
        except (MedlensError, OSError):
            return None
        return prepare_image(pixels, BASELINE_SIZE, **self.options)


class _CachedImages:
    """A preprocessing cache's readable images by absolute path, as float [0, 1]."""

    def __init__(self, cache: ImageCache):
        self.cache = cache
        self.rows = {os.path.abspath(p): i for i, p in enumerate(cache.paths) if cache.status[i] == "ok"}

    def get(self, path: str) -> np.ndarray | None:
        row = self.rows.get(path)
        return None if row is None else self.cache.get_float(row)

    def __bool__(self) -> bool:
        return bool(self.rows)


def _open_cache(
    config: Mapping[str, Any], run_dir: Path | None, channels: int, options: Mapping[str, Any]
) -> _CachedImages | None:
    """The run's preprocessing cache, if it is here, finished, and prepared the images as the model does."""
    folder = (config.get("data") or {}).get("cache") or (run_dir / CACHE_DIR if run_dir is not None else None)
    if folder is None or not Path(folder).is_dir():
        return None
    try:
        cache = ImageCache(Path(folder))
    except (MedlensError, OSError, ValueError):
        return None
    prepared = {key: cache.meta.get(key, default) for key, default in NO_OPTIONS.items()}
    same = cache.channels == channels and prepared == dict(options)
    return _CachedImages(cache) if same and cache.size >= BASELINE_SIZE else None
