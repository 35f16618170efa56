"""A run's data: the record table, its patient-grouped splits (kept in splits.csv) and the preprocessing cache.

Under ``torchrun`` rank 0 generates phantoms, builds the cache and writes splits.csv; the other ranks wait at
a barrier and then read what it wrote, so every rank trains on the same rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlens.config import PHANTOMS, Config
from medlens.data.cache import ImageCache, build_cache
from medlens.data.phantoms import ensure_phantoms
from medlens.data.records import RecordTable, load_source
from medlens.data.splits import check_no_leakage, patient_split, read_splits, undersample, write_splits
from medlens.errors import ConfigError
from medlens.runs import CACHE_DIR, PHANTOMS_DIR, SPLITS_FILE
from medlens.training.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class RunData:
    table: RecordTable
    splits: dict[str, np.ndarray]
    cache: ImageCache
    cache_rows: np.ndarray
    """Each table row's row in the cache."""


def prepare_data(config: Config, run_dir: Path, engine: Engine, resize: str = "squash") -> RunData:
    """The table, its patient-grouped splits (kept in splits.csv) and the preprocessing cache (``resize``: as
    the model's weights want their images, see :data:`medlens.data.transforms.RESIZE_MODES`)."""
    table, cache, cache_rows = load_cached_table(config, run_dir, engine, resize)
    splits = load_or_make_splits(config, run_dir, table, engine)
    return RunData(table, splits, cache, cache_rows)


def load_table(config: Config, run_dir: Path, engine: Engine) -> RecordTable:
    """The data source's table (phantoms generated into the run folder when the config asks), views filtered."""
    if config.data.source == PHANTOMS:
        spec = config.data.phantoms
        if engine.is_main:
            ensure_phantoms(run_dir / PHANTOMS_DIR, n=spec.n, task=spec.task, size=spec.size, seed=spec.seed)  # type: ignore[arg-type]
        engine.barrier()
        return load_source(run_dir / PHANTOMS_DIR)
    table = load_source(config.data.source, config.data.format)  # type: ignore[arg-type]
    if config.data.views:
        if "view" not in table.frame.columns:
            raise ConfigError(f"data.views={config.data.views} but {config.data.source} has no view column")
        table = table.subset(np.flatnonzero(table.frame["view"].isin(config.data.views).to_numpy()))
    return table


def load_cached_table(
    config: Config, run_dir: Path, engine: Engine, resize: str = "squash"
) -> tuple[RecordTable, ImageCache, np.ndarray]:
    """The table of readable images, the preprocessing cache holding them, and each image's cache row."""
    table = load_table(config, run_dir, engine)
    d = config.data
    cache_dir = Path(d.cache) if d.cache else run_dir / CACHE_DIR
    if engine.is_main:
        build_cache(
            table.paths,
            cache_dir,
            d.image_size,
            d.channels,  # type: ignore[arg-type]
            contrast=d.contrast,
            crop_border=d.crop_border,
            resize=resize,
        )
    engine.barrier()
    cache = ImageCache(cache_dir)
    cache_rows = cache.indices_of([str(p) for p in table.paths])
    readable = cache.status[cache_rows] == "ok"
    if not readable.all():
        log.warning("%d unreadable images left out of training", int((~readable).sum()))
        table, cache_rows = table.subset(np.flatnonzero(readable)), cache_rows[readable]
    return table, cache, cache_rows


def load_or_make_splits(
    config: Config, run_dir: Path, table: RecordTable, engine: Engine
) -> dict[str, np.ndarray]:
    """splits.csv's splits if the run folder has one, else new patient-grouped ones (written by rank 0)."""
    path = run_dir / SPLITS_FILE
    if path.exists():
        splits = read_splits(path, table)
    else:
        val, test = config.data.val_fraction, config.data.test_fraction
        fractions = {"train": 1.0 - val - test, "val": val, "test": test}
        splits = patient_split(table, fractions, seed=config.train.seed)
        if engine.is_main:
            write_splits(path, table, splits)
    check_no_leakage(table, splits)
    if config.data.undersample:
        kept = undersample(
            table, splits["train"], config.data.undersample, config.data.undersample_keep, config.train.seed
        )
        log.info("undersampled %r: %d -> %d training images", config.data.undersample, len(splits["train"]), len(kept))
        splits["train"] = kept
    if len(splits.get("train", [])) == 0 or len(splits.get("val", [])) == 0:
        raise ConfigError(f"the split left no training or no validation images ({len(table)} images in all)")
    return splits
