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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medlens.data.readers import IMAGE_SUFFIXES
from medlens.data.records import load_source
from medlens.errors import DataSourceError, ImageReadError
from medlens.inference import Predictor

if TYPE_CHECKING:
    from medlens.explain.study import Study
    from medlens.faces.pipeline import FacePredictor

log = logging.getLogger(__name__)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from files, folders (searched recursively) and data-source CSVs, in a stable order."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.name.lower().endswith((".csv", ".csv.gz")):
            found += load_source(item).paths
        elif item.exists():
            found.append(item)
        else:
            raise DataSourceError(f"{item} does not exist")
    return found


def predict_to_csv(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> int:
    """Append a row per image (path, probabilities, positives, error) to ``out``; returns rows written."""
    out = Path(out)
    paths = collect_images(inputs)
    done = _done_paths(out)
    todo = [p for p in paths if str(p) not in done]
    if done:
        log.info("%s already holds %d rows: predicting the %d images left", out, len(done), len(todo))
    columns = ["path", *(f"prob_{name}" for name in predictor.labels), "positives", "error"]
    fresh = not out.exists() or out.stat().st_size == 0
    written = 0
    with out.open("a", newline="") as handle, ThreadPoolExecutor(max_workers=workers) as pool:
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(columns)
        bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=not progress)
        for chunk, images in _prefetched(pool, predictor, todo, batch_size):
            readable = [i for i, image in enumerate(images) if not isinstance(image, str)]
            probs = predictor.predict_prepared([images[i] for i in readable]) if readable else np.zeros((0, 0))
            rows = {i: p for i, p in zip(readable, probs, strict=True)}
            for i, path in enumerate(chunk):
                if i in rows:
                    cells = [f"{p:.6f}" for p in rows[i]]
                    writer.writerow([str(path), *cells, "|".join(predictor.positives(rows[i])), ""])
                else:
                    writer.writerow([str(path), *[""] * len(predictor.labels), "", images[i]])
            handle.flush()  # a killed job keeps every finished batch
            written += len(chunk)
            bar.update(len(chunk))
        bar.close()
    return written


def write_classifier_reports(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "gradcam",
    view: str | None = None,
    patient_label: str | None = None,
    xray_guard: bool = True,
    pdf: bool = True,
    progress: bool = True,
) -> Path:
    """A study report per image through an image checkpoint (see :func:`write_reports`); returns the index."""
    from medlens.explain.cam import CamExplainer
    from medlens.explain.study import classifier_study

    with CamExplainer(predictor.model, method) as explainer:

        def study_of(data: bytes, name: str, image_view: str | None) -> Study:
            return classifier_study(
                predictor,
                explainer,
                data,
                name=name,
                view=image_view,
                patient_label=patient_label,
                xray_guard=xray_guard,
            )

        return write_reports(study_of, inputs, out, view=view, pdf=pdf, progress=progress)


def write_face_reports(
    predictor: FacePredictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    patient_label: str | None = None,
    pdf: bool = True,
    progress: bool = True,
) -> Path:
    """A study report per photo through a face checkpoint (see :func:`write_reports`); returns the index."""
    from medlens.explain.study import face_study_of

    def study_of(data: bytes, name: str, image_view: str | None) -> Study:
        return face_study_of(predictor, data, patient_label=patient_label, name=name)

    return write_reports(study_of, inputs, out, pdf=pdf, progress=progress)


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
    from medlens.explain.run import unique_stem
    from medlens.explain.study_report import INDEX_FILE, IndexEntry, brief, find_chromium, render_index, write_study
    from medlens.io import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = collect_images(inputs)
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
        if item.is_file() and item.name.lower().endswith((".csv", ".csv.gz")):
            table = load_source(item)
            if "view" in table.frame:
                views |= {p: str(v) for p, v in zip(table.paths, table.frame["view"], strict=True) if pd.notna(v)}
    return views


def _prefetched(
    pool: ThreadPoolExecutor, predictor: Predictor, paths: list[Path], batch_size: int
) -> Iterator[tuple[list[Path], list[np.ndarray | str]]]:
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


def _read(predictor: Predictor, path: Path) -> np.ndarray | str:
    try:
        return predictor.preprocess(predictor.read(path))
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
