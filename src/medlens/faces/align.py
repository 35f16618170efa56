"""Aligned face chips in a folder per class: the data of the CNN route for faces (the syndromes12 config)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medlens.data.records import load_source
from medlens.errors import DataSourceError
from medlens.faces.detect import DEFAULT_SETTINGS, FacesConfig, NoFaceError, detect_face

log = logging.getLogger(__name__)


def align_faces(
    source: str | Path, out: str | Path, settings: FacesConfig = DEFAULT_SETTINGS, progress: bool = True
) -> tuple[int, list[Path]]:
    """Write the aligned face chip of every photo as ``out/<class>/<name>.png`` plus ``out/metadata.csv``.

    The result is a folder-per-class SOURCE for the CNN route (the syndromes12 config), with each
    photo's patient_id kept. Returns the number of chips written and the photos that show no face.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from medlens.io import write_atomic

    table = load_source(source)
    if table.task != "multiclass":
        raise DataSourceError(f"{source}: aligning faces needs one class per photo; this source is {table.task}")
    out = Path(out)
    classes = np.asarray(table.label_names)[table.labels.argmax(axis=1)]
    rows, no_face = [], []
    for path, label, patient in tqdm(
        zip(table.paths, classes, table.patient_ids, strict=True), total=len(table), desc="aligning",
        unit="img", disable=not progress,
    ):  # fmt: skip
        try:
            chip = detect_face(path, settings).chip
        except NoFaceError:
            no_face.append(path)
            continue
        relative = f"{label}/{path.stem}.png"
        (out / label).mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(chip).save(buffer, format="PNG")
        write_atomic(out / relative, buffer.getvalue())
        rows.append((relative, patient))
    write_atomic(out / "metadata.csv", pd.DataFrame(rows, columns=["path", "patient_id"]).to_csv(index=False))
    if no_face:
        log.warning("%d of %d photos show no face and were not aligned", len(no_face), len(table))
    return len(rows), no_face
