"""``medlens predict``: probabilities for many images into a CSV, resumable, decoding beside compute.

Images are decoded on a thread pool while the model runs on the previous batch (the PNG decoder, PIL,
OpenCV and pydicom release the GIL while decoding), memory stays bounded by a few batches, and rows
already in the output CSV are skipped on a re-run, so a killed job continues where it stopped.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medlens.data.files import image_files
from medlens.data.records import is_csv, load_source
from medlens.errors import DataSourceError, ImageReadError
from medlens.inference import Model
from medlens.reports.study import Study

log = logging.getLogger(__name__)

def predict_to_csv(
    predictor: Model,
    inputs: Sequence[str | Path],
    out: str | Path,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> int:
    """Append a row per image to ``out``: path, probabilities, positives (multi-class also the top class),
    what the model found beside its scores (``predictor.details``, e.g. a face model's ``n_faces``), and the
    error (unreadable, no face, ...) where there is one; returns the rows written."""
    out = Path(out)
    paths = image_files(inputs)
    done = _done_paths(out)
    todo = [p for p in paths if str(p) not in done]
    if done:
        log.info("%s already holds %d rows: predicting the %d images left", out, len(done), len(todo))
    top = ["top_class"] if predictor.task == "multiclass" else []
    columns = ["path", *(f"prob_{name}" for name in predictor.labels), "positives", *top, *predictor.details, "error"]
    fresh = not out.exists() or out.stat().st_size == 0
    written = 0
    with out.open("a", newline="") as handle, ThreadPoolExecutor(max_workers=workers) as pool:
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(columns)
        bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=not progress)
        for chunk, images in _prefetched(pool, predictor, todo, batch_size):
            writer.writerows(_rows(predictor, chunk, images, top))
            handle.flush()  # a killed job keeps every finished batch
            written += len(chunk)
            bar.update(len(chunk))
        bar.close()
    return written


def _rows(predictor: Model, chunk: list[Path], images: list[Any], top: list[str]) -> list[list[str]]:
    """One CSV row per image of a batch; ``images`` holds prepared images, or the problem of unreadable ones."""
    readable = [i for i, image in enumerate(images) if not isinstance(image, str)]
    scores = predictor.logits([images[i] for i in readable]) if readable else None
    answers = dict(zip(readable, range(len(readable)), strict=True))
    rows = []
    for i, path in enumerate(chunk):
        blank = [""] * (len(predictor.labels) + 1 + len(top))
        if i not in answers:
            rows.append([str(path), *blank, *[""] * len(predictor.details), images[i]])
            continue
        k = answers[i]
        details = [str(scores.details[k].get(name, "")) for name in predictor.details]  # type: ignore[union-attr]
        problem = scores.problems[k]  # type: ignore[union-attr]
        if problem is not None:
            rows.append([str(path), *blank, *details, problem.summary])
            continue
        probs = predictor.probabilities(scores.values[k : k + 1])[0]  # type: ignore[union-attr]
        positives = predictor.positives(probs)
        named = [predictor.labels[int(np.argmax(probs))]] if top else []
        rows.append([str(path), *(f"{p:.6f}" for p in probs), "|".join(positives), *named, *details, ""])
    return rows


def write_study_reports(
    predictor: Model,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    method: str | None = None,
    view: str | None = None,
    patient_label: str | None = None,
    pdf: bool = True,
    progress: bool = True,
) -> Path:
    """A study report per image through any checkpoint (see :func:`write_reports`); returns the index."""
    from medlens.reports.study import study_of

    def study(data: bytes, name: str, image_view: str | None) -> Study:
        return study_of(predictor, data, name=name, view=image_view, patient_label=patient_label, method=method)

    try:
        return write_reports(study, inputs, out, view=view, pdf=pdf, progress=progress)
    finally:
        predictor.close()


def write_reports(
    study_of: Callable[[bytes, str, str | None], Study],
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    view: str | None = None,
    pdf: bool = True,
    progress: bool = True,
) -> Path:
    """``out/<stem>.html`` per image (and ``.pdf`` where Chromium is installed), and ``out/index.html``.

    ``study_of(data, name, view)`` gathers one image's facts; an image's view is the one its data-source
    record names, else ``view``. Unreadable images are listed in the index with the reason.
    """
    from medlens.io import write_atomic
    from medlens.jobs.explain import unique_stem
    from medlens.reports.study_page import INDEX_FILE, IndexEntry, brief, find_chromium, render_index, write_study

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = image_files(inputs)
    views = record_views(inputs)
    chromium = find_chromium() if pdf else None
    if pdf and chromium is None:
        log.warning("no Chromium on PATH: writing HTML reports only (scripts/setup-system.sh installs it for PDFs)")
    entries: list[IndexEntry] = []
    stems: set[str] = set()
    for path in tqdm(paths, desc="reports", unit="img", disable=not progress):
        stem = unique_stem(path.stem, stems)
        try:
            study = study_of(path.read_bytes(), path.name, views.get(path, view))
        except ImageReadError as exc:
            log.warning("%s: no report (%s)", path, exc.problem)
            entries.append(IndexEntry(path.name, None, None, f"unreadable: {exc.problem}"))
            continue
        page, printed = write_study(study, out / f"{stem}.html", chromium)
        entries.append(IndexEntry(path.name, page.name, printed.name if printed else None, brief(study)))
    return write_atomic(out / INDEX_FILE, render_index(entries))


def record_views(inputs: Sequence[str | Path]) -> dict[Path, str]:
    """The view (PA, AP, ...) that data-source CSVs among ``inputs`` record for their images."""
    views: dict[Path, str] = {}
    for item in map(Path, inputs):
        if item.is_file() and is_csv(item):
            table = load_source(item)
            if "view" in table.frame:
                views |= {p: str(v) for p, v in zip(table.paths, table.frame["view"], strict=True) if pd.notna(v)}
    return views


def _prefetched(
    pool: ThreadPoolExecutor, predictor: Model, paths: list[Path], batch_size: int
) -> Iterator[tuple[list[Path], list[Any]]]:
    """Batches of decoded images, the next batch decoding while the caller computes on this one."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    pending: list[tuple[list[Path], list[Future]]] = []
    for chunk in chunks[:2]:
        pending.append((chunk, [pool.submit(_read, predictor, p) for p in chunk]))
    for index in range(len(chunks)):
        chunk, futures = pending.pop(0)
        if index + 2 < len(chunks):
            ahead = chunks[index + 2]
            pending.append((ahead, [pool.submit(_read, predictor, p) for p in ahead]))
        yield chunk, [f.result() for f in futures]


def _read(predictor: Model, path: Path) -> Any:
    try:
        return predictor.prepare(predictor.read(path))
    except ImageReadError as exc:
        return exc.problem


def _done_paths(out: Path) -> set[str]:
    if not out.exists() or out.stat().st_size == 0:
        return set()
    try:
        return set(pd.read_csv(out, usecols=["path"], dtype=str)["path"])
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataSourceError(
            f"{out} exists but is not a medlens predictions CSV ({exc}); choose another --out"
        ) from None
