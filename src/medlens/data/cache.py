"""The preprocessing cache: every image decoded and resized once, kept as a memory-mapped uint8 array.

A cache folder holds:

- ``images.u8``: raw uint8 rows of shape ``(N, size, size)`` or ``(N, size, size, 3)``, row ``i`` = image ``i``;
- ``index.csv``: ``index, path`` (as given), ``height, width`` (of the original; 0 if unreadable),
  ``status`` (``ok`` / ``unreadable``) and ``error``;
- ``cache.json``: ``version, size, channels, contrast, crop_border, resize, n, chunk_size, created``;
- ``done.npy``: one flag per chunk of rows, so an interrupted build redoes only its unfinished chunks;
- ``progress.jsonl``: during a build only, each finished chunk's original sizes and errors.

Pixels go through :func:`~medlens.data.readers.read_image` and :func:`~medlens.data.transforms.prepare_image`,
the same two functions inference uses, so cached and live preprocessing cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from medlens.data.readers import read_image
from medlens.data.transforms import prepare_image
from medlens.errors import CacheError, ConfigError, DataSourceError, ImageReadError
from medlens.io import write_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
BUILD_COMMAND = "medlens data cache SOURCE --size N --out DIR"
PENDING = "pending"
_MAX_CHUNK = 64

# One chunk's result: its number and, per image, (height, width, error or "").
_ChunkResult = tuple[int, list[tuple[int, int, str]]]


@dataclass(frozen=True)
class _Job:
    """A chunk of rows for one worker."""

    images: str
    chunk: int
    start: int
    paths: tuple[str, ...]
    size: int
    channels: int
    contrast: str
    crop_border: float | str
    resize: str


class ImageCache:
    """A finished cache, opened read-only: ``cache[i]`` is image ``i`` as uint8."""

    def __init__(self, out: Path):
        self.root = Path(out)
        meta, index, done = _read_state(self.root)
        if meta is None or index is None or done is None or not done.all() or (index["status"] == PENDING).any():
            raise CacheError(
                f"{self.root} is not a finished image cache (missing or incomplete cache.json, index.csv or "
                f"done.npy); build it with: {BUILD_COMMAND}"
            )
        self.meta: dict = meta
        """cache.json: the size, channels and preprocessing options the images were prepared with."""
        self.size: int = meta["size"]
        self.channels: int = meta["channels"]
        self.paths: list[str] = index["path"].tolist()
        self.status: np.ndarray = index["status"].to_numpy(dtype=str)
        self.errors: np.ndarray = index["error"].to_numpy(dtype=str)
        self.images = np.memmap(self.root / "images.u8", dtype=np.uint8, mode="r", shape=_shape(meta))
        self._rows: dict[str, int] = {}
        for row, path in enumerate(self.paths):
            self._rows.setdefault(path, row)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i])

    def get_float(self, i: int) -> np.ndarray:
        """Image ``i`` as float32 in [0, 1], as :func:`prepare_image` gave it (to within 1/255)."""
        return self.images[i].astype(np.float32) / 255.0

    def indices_of(self, paths: Sequence[str | Path]) -> np.ndarray:
        """The rows of ``paths``, in their order."""
        rows = np.empty(len(paths), dtype=np.int64)
        for k, path in enumerate(paths):
            row = self._rows.get(str(path))
            if row is None:
                raise KeyError(f"{str(path)!r} is not in the image cache at {self.root} ({len(self)} images)")
            rows[k] = row
        return rows


def build_cache(
    paths: Sequence[str | Path],
    out: Path,
    size: int = 256,
    channels: Literal[1, 3] = 1,
    workers: int | None = None,
    progress: bool = True,
    contrast: str = "none",
    crop_border: float | str = 0.0,
    resize: str = "squash",
) -> ImageCache:
    """Decode, resize and store every image once; resumes an interrupted build, returns a finished one as is.

    Unreadable images are zero-filled and marked ``unreadable`` in ``index.csv`` with the reason. A cache in
    ``out`` built from other paths, size, channels or ``contrast`` / ``crop_border`` / ``resize`` (see
    :func:`~medlens.data.transforms.prepare_image`) is never overwritten: that raises ValueError.
    With ``workers`` > 1 the chunks go to worker processes, which import the main script: call this from
    under ``if __name__ == "__main__":`` there.
    """
    if size < 1:
        raise ConfigError(f"the cache's image size must be a positive number of pixels, not {size!r}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, not {channels!r}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers!r}")
    paths = [str(p) for p in paths]
    if not paths:
        raise DataSourceError("no images to cache: the data source holds none")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta, index, done = _read_state(out)
    if meta is None:
        meta, index, done = _start(out, paths, size, channels, _options(contrast, crop_border, resize))
    else:
        options = _options(contrast, crop_border, resize)
        _check_same(out, meta, index, paths, {"size": size, "channels": channels, **options})
        done = _recover(out, meta, index, done)
    chunk_size = meta["chunk_size"]
    jobs = [
        _Job(
            str(out / "images.u8"),
            k,
            k * chunk_size,
            tuple(paths[k * chunk_size : (k + 1) * chunk_size]),
            size,
            channels,
            contrast,
            crop_border,
            resize,
        )
        for k in map(int, np.flatnonzero(~done))
    ]
    if jobs:
        remaining = sum(len(job.paths) for job in jobs)
        with (
            tqdm(
                total=len(paths), initial=len(paths) - remaining, desc="caching", unit="img", disable=not progress
            ) as bar,
            open(out / "progress.jsonl", "a", encoding="utf-8") as journal,
        ):
            for chunk, rows in _run(jobs, workers or os.cpu_count() or 1):
                # The record goes first: a chunk flagged done always has its sizes and errors on file.
                journal.write(json.dumps({"chunk": chunk, "rows": rows}) + "\n")
                journal.flush()
                done[chunk] = True
                _save_done(out, done)
                _record(index, chunk * chunk_size, rows)
                bar.update(len(rows))
    if jobs or (out / "progress.jsonl").exists():
        write_atomic(out / "index.csv", index.to_csv(index=False, lineterminator="\n"))
        (out / "progress.jsonl").unlink(missing_ok=True)
        unreadable = int((index["status"] != "ok").sum())
        if unreadable:
            log.warning(
                "%d of %d images were unreadable: zero-filled, see %s", unreadable, len(index), out / "index.csv"
            )
    return ImageCache(out)


def _chunk_size(n: int) -> int:
    """Rows per chunk: about 64 chunks for small sets (resume stays fine-grained), at most 64 rows."""
    return max(1, min(_MAX_CHUNK, -(-n // 64)))


def _shape(meta: dict) -> tuple[int, ...]:
    side = (meta["size"], meta["size"])
    return (meta["n"], *side) if meta["channels"] == 1 else (meta["n"], *side, 3)


def _read_state(out: Path) -> tuple[dict | None, pd.DataFrame | None, np.ndarray | None]:
    """cache.json, index.csv and done.npy of ``out``, each None where absent."""
    meta = json.loads((out / "cache.json").read_text()) if (out / "cache.json").is_file() else None
    index = (
        pd.read_csv(out / "index.csv", dtype={"path": str, "status": str, "error": str}, keep_default_na=False)
        if (out / "index.csv").is_file()
        else None
    )
    done = np.load(out / "done.npy") if (out / "done.npy").is_file() else None
    return meta, index, done


def _options(contrast: str, crop_border: float | str, resize: str) -> dict[str, str | float]:
    """The preprocessing options as cache.json records them (a cache from before them had none)."""
    return {"contrast": contrast, "crop_border": crop_border, "resize": resize}


def _start(
    out: Path, paths: list[str], size: int, channels: int, options: dict[str, str | float]
) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Lay out a new cache; cache.json goes last, so its presence means the layout is complete."""
    n = len(paths)
    chunk_size = _chunk_size(n)
    meta = {
        "version": CACHE_VERSION,
        "size": size,
        "channels": channels,
        **options,
        "n": n,
        "chunk_size": chunk_size,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with open(out / "images.u8", "wb") as f:
        f.truncate(int(np.prod(_shape(meta))))
    (out / "progress.jsonl").unlink(missing_ok=True)
    done = np.zeros(-(-n // chunk_size), dtype=bool)
    _save_done(out, done)
    index = pd.DataFrame(
        {"index": np.arange(n), "path": paths, "height": 0, "width": 0, "status": PENDING, "error": ""}
    )
    write_atomic(out / "index.csv", index.to_csv(index=False, lineterminator="\n"))
    write_atomic(out / "cache.json", json.dumps(meta, indent=2) + "\n")
    return meta, index, done


def _check_same(out: Path, meta: dict, index: pd.DataFrame | None, paths: list[str], wanted: dict) -> None:
    """Refuse to mix two different caches in one folder."""
    advice = f"choose another --out, or delete {out} to rebuild it"
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{out} holds a cache of version {meta.get('version')!r}, not {CACHE_VERSION}: {advice}")
    have = {**_options("none", 0.0, "squash"), **meta}
    for key, value in wanted.items():
        if have[key] != value:
            raise CacheError(f"{out} holds a cache with {key}={have[key]}, not the requested {key}={value}: {advice}")
    if index is None:
        raise CacheError(f"{out} has cache.json but no index.csv: {advice}")
    cached = index["path"].tolist()
    if len(cached) != len(paths):
        raise CacheError(f"{out} holds a cache of {len(cached)} images, not the requested {len(paths)}: {advice}")
    for row, (have, want) in enumerate(zip(cached, paths, strict=True)):
        if have != want:
            raise CacheError(f"{out} holds a cache whose image {row} is {have!r}, not the requested {want!r}: {advice}")


def _recover(out: Path, meta: dict, index: pd.DataFrame, done: np.ndarray | None) -> np.ndarray:
    """Which chunks an earlier build finished: flagged in done.npy and with their facts on record."""
    chunk_size = meta["chunk_size"]
    chunks = -(-meta["n"] // chunk_size)
    if done is None or done.shape != (chunks,):
        done = np.zeros(chunks, dtype=bool)
    for chunk, rows in _journal(out / "progress.jsonl"):
        if chunk < chunks and done[chunk]:
            _record(index, chunk * chunk_size, rows)
    pending = (index["status"] == PENDING).to_numpy()
    for chunk in np.flatnonzero(done):
        if pending[chunk * chunk_size : (chunk + 1) * chunk_size].any():
            done[chunk] = False
    return done


def _journal(path: Path) -> Iterator[_ChunkResult]:
    """The chunk records of progress.jsonl; a line cut short by an interruption is skipped."""
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            yield int(entry["chunk"]), [(int(h), int(w), str(e)) for h, w, e in entry["rows"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue


def _record(index: pd.DataFrame, start: int, rows: list[tuple[int, int, str]]) -> None:
    stop = start + len(rows)
    heights, widths, errors = zip(*rows, strict=True)
    index.loc[start : stop - 1, "height"] = heights
    index.loc[start : stop - 1, "width"] = widths
    index.loc[start : stop - 1, "error"] = errors
    index.loc[start : stop - 1, "status"] = ["unreadable" if e else "ok" for e in errors]


def _save_done(out: Path, done: np.ndarray) -> None:
    tmp = out / f".done.{os.getpid()}.tmp.npy"
    np.save(tmp, done)
    os.replace(tmp, out / "done.npy")


def _run(jobs: list[_Job], workers: int) -> Iterator[_ChunkResult]:
    """Chunk results as they finish: in this process for one worker, else over a process pool."""
    if workers == 1 or len(jobs) == 1:
        yield from map(_cache_chunk, jobs)
        return
    # forkserver (spawn where there is none), not fork: a forked child inherits the parent's OpenCV and
    # OpenMP thread pools without their threads, and hangs on their locks.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_init_worker)
    try:
        for future in as_completed([pool.submit(_cache_chunk, job) for job in jobs]):
            yield future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "a cache worker process died. Worker processes import the main script: if build_cache is called "
            'from a script, put the call under `if __name__ == "__main__":`, or pass workers=1'
        ) from exc
    finally:
        pool.shutdown(cancel_futures=True)


def _init_worker() -> None:
    # One OpenCV thread per process: the pool already uses every core.
    cv2.setNumThreads(1)


def _cache_chunk(job: _Job) -> _ChunkResult:
    """Decode and resize a chunk's images into their rows of the memmap."""
    row_shape = (job.size, job.size) if job.channels == 1 else (job.size, job.size, 3)
    rows = np.memmap(
        job.images,
        dtype=np.uint8,
        mode="r+",
        offset=job.start * int(np.prod(row_shape)),
        shape=(len(job.paths), *row_shape),
    )
    facts = []
    for k, path in enumerate(job.paths):
        try:
            pixels = read_image(path, channels=job.channels)  # type: ignore[arg-type]
        except ImageReadError as exc:
            rows[k] = 0
            facts.append((0, 0, exc.problem))
            continue
        rows[k] = prepare_image(pixels, job.size, job.contrast, job.crop_border, job.resize)
        facts.append((pixels.shape[0], pixels.shape[1], ""))
    rows.flush()
    return job.chunk, facts
