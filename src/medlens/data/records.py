"""Record tables: the one shape every data source is read into.

A :class:`RecordTable` is a frame with one row per image (``path`` relative to ``root``, ``patient_id``
when known, metadata columns) plus an ``N x K`` float32 label matrix where NaN means unknown. Three sources
give that shape: a folder of class folders, a generic CSV, and the official NIH ChestX-ray14
``Data_Entry_2017*.csv``. A new source only has to say how to read its records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from medlens.data.readers import IMAGE_SUFFIXES
from medlens.errors import DataSourceError

log = logging.getLogger(__name__)

Task = Literal["multiclass", "multilabel"]
SourceFormat = Literal["folder", "nih", "csv"]
SOURCE_FORMATS: tuple[SourceFormat, ...] = ("folder", "nih", "csv")

NIH_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
NIH_COLUMNS = {
    "Image Index": "image",
    "Finding Labels": "findings",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}


@dataclass
class RecordTable:
    """Images, their patients and labels, read from one source."""

    root: Path
    frame: pd.DataFrame
    labels: np.ndarray
    label_names: list[str]
    task: Task
    kind: SourceFormat

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.frame), len(self.label_names)):
            raise ValueError(
                f"labels are {self.labels.shape}, expected ({len(self.frame)}, {len(self.label_names)})"
            )

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def paths(self) -> list[Path]:
        """Absolute image paths, in row order."""
        return [self.root / p for p in self.frame["path"]]

    @property
    def patient_ids(self) -> np.ndarray:
        return self.frame["patient_id"].to_numpy(dtype=str)

    def subset(self, rows: Sequence[int] | np.ndarray) -> RecordTable:
        """The table restricted to ``rows`` (positions), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return RecordTable(
            self.root,
            self.frame.iloc[rows].reset_index(drop=True),
            self.labels[rows],
            list(self.label_names),
            self.task,
            self.kind,
        )

    def relabel(self, label_names: Sequence[str]) -> RecordTable:
        """Align the labels to ``label_names``: same order, unknown (NaN) where this source lacks one."""
        position = {name: i for i, name in enumerate(self.label_names)}
        labels = np.full((len(self), len(label_names)), np.nan, dtype=np.float32)
        for j, name in enumerate(label_names):
            if name in position:
                labels[:, j] = self.labels[:, position[name]]
        return RecordTable(self.root, self.frame, labels, list(label_names), self.task, self.kind)


def load_source(source: str | Path, format: SourceFormat | None = None) -> RecordTable:
    """Read any data SOURCE: a folder of class folders, a folder with an NIH CSV, or a CSV file."""
    path = Path(source)
    if not path.exists():
        raise DataSourceError(f"data source {str(path)!r} does not exist")
    if format is not None and format not in SOURCE_FORMATS:
        raise DataSourceError(f"unknown data format {format!r}; valid formats: {', '.join(SOURCE_FORMATS)}")
    kind = format or detect_format(path)
    if kind == "folder":
        return read_folder(path)
    csv_path = path if path.is_file() else _find_csv(path)
    if kind == "nih":
        return read_nih(csv_path)
    return read_csv(csv_path)


def detect_format(path: Path) -> SourceFormat:
    """Tell which kind of source ``path`` is, or say why it is none."""
    if path.is_file():
        if not is_csv(path):
            raise DataSourceError(
                f"{path}: a data source file must be a .csv or .csv.gz, not {path.suffix!r}"
            )
        return "nih" if _is_nih_csv(path) else "csv"
    if _nih_csvs(path):
        return "nih"
    if _class_folders(path):
        return "folder"
    if _generic_csvs(path):
        return "csv"
    raise DataSourceError(
        f"{path}: not a data source: expected class folders holding images, a Data_Entry_2017*.csv "
        "beside images/, or a labels CSV (or name the format with --format folder|nih|csv)"
    )


def read_folder(root: str | Path) -> RecordTable:
    """A folder per class; an optional ``metadata.csv`` beside them joins ``patient_id`` etc. by ``path``."""
    root = Path(root)
    classes = _class_folders(root)
    if not classes:
        raise DataSourceError(f"{root}: no class folders with images inside")
    rows = [
        (f"{folder.name}/{image.name}", folder.name)
        for folder in classes
        for image in sorted(folder.iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES
    ]
    frame = pd.DataFrame(rows, columns=["path", "label"])
    meta_path = root / "metadata.csv"
    if meta_path.exists():
        meta = pd.read_csv(meta_path, dtype={"patient_id": str})
        if "path" not in meta.columns:
            raise DataSourceError(f"{meta_path}: needs a 'path' column (relative to {root})")
        meta = meta.drop(columns=[c for c in ("label",) if c in meta.columns])
        frame = frame.merge(meta.drop_duplicates("path"), on="path", how="left")
    if "patient_id" not in frame.columns:
        frame["patient_id"] = pd.NA
    frame["patient_id"] = _fill_patient_ids(frame)
    names = [folder.name for folder in classes]
    labels = _one_hot(frame["label"].to_numpy(), names)
    return RecordTable(root, frame, labels, names, "multiclass", "folder")


def read_csv(csv_path: str | Path, root: str | Path | None = None) -> RecordTable:
    """A generic CSV: ``path``, ``label`` (one class) or ``labels`` (pipe-separated), optional ``patient_id``.

    Paths are relative to ``root`` (default: the CSV's folder). In ``labels``, an empty cell or
    ``No Finding`` means no positive finding.
    """
    csv_path = Path(csv_path)
    frame = _read_table(csv_path, dtype={"patient_id": str, "path": str})
    if "path" not in frame.columns:
        raise DataSourceError(
            f"{csv_path}: a generic CSV needs a 'path' column; it has {list(frame.columns)}"
        )
    if "patient_id" not in frame.columns:
        frame["patient_id"] = pd.NA
    frame["patient_id"] = _fill_patient_ids(frame)
    root = Path(root) if root is not None else csv_path.parent
    if "labels" in frame.columns:
        findings = frame["labels"].fillna("").astype(str)
        names = sorted({f for cell in findings for f in _split_findings(cell)})
        labels = _multi_hot(findings, names)
        return RecordTable(root, frame, labels, names, "multilabel", "csv")
    if "label" in frame.columns:
        if frame["label"].isna().any():
            raise DataSourceError(
                f"{csv_path}: {int(frame['label'].isna().sum())} rows have an empty 'label'"
            )
        frame["label"] = frame["label"].astype(str)
        names = sorted(frame["label"].unique())
        return RecordTable(
            root, frame, _one_hot(frame["label"].to_numpy(), names), names, "multiclass", "csv"
        )
    raise DataSourceError(
        f"{csv_path}: a generic CSV needs a 'label' (one class per image) or 'labels' (pipe-separated) column"
    )


def read_nih(
    csv_path: str | Path,
    images_dir: str | Path | None = None,
    views: Sequence[str] | None = None,
) -> RecordTable:
    """The official NIH ChestX-ray14 ``Data_Entry_2017*.csv``: 14 findings, "No Finding" as all zeros.

    Images are looked up in ``images_dir`` (default ``images/`` beside the CSV). ``views`` keeps only those
    View Positions (e.g. ``["PA"]``). Where the official ``train_val_list.txt`` / ``test_list.txt`` lie
    beside the CSV, an ``official_split`` column says which list each image is on.
    """
    csv_path = Path(csv_path)
    raw = _read_table(csv_path, usecols=lambda c: c in NIH_COLUMNS, dtype={"Patient ID": str})
    missing = sorted(set(NIH_COLUMNS) - set(raw.columns) - {"Follow-up #", "Patient Age", "Patient Gender"})
    if missing:
        raise DataSourceError(f"{csv_path}: not an NIH Data_Entry CSV, missing columns {missing}")
    frame = raw.rename(columns=NIH_COLUMNS)
    if views is not None:
        frame = frame[frame["view"].isin(list(views))].reset_index(drop=True)
    folder = Path(images_dir) if images_dir is not None else csv_path.parent / "images"
    frame.insert(0, "path", folder.name + "/" + frame["image"])
    frame["patient_id"] = frame["patient_id"].astype(str)
    findings = frame["findings"].astype(str)
    unknown = sorted({f for cell in findings.unique() for f in _split_findings(cell)} - set(NIH_LABELS))
    if unknown:
        raise DataSourceError(f"{csv_path}: unknown findings {unknown}; NIH findings are {list(NIH_LABELS)}")
    labels = _multi_hot(findings, list(NIH_LABELS))
    _join_official_split(frame, csv_path.parent)
    return RecordTable(folder.parent, frame, labels, list(NIH_LABELS), "multilabel", "nih")


def read_nih_boxes(csv_path: str | Path) -> pd.DataFrame:
    """The NIH ``BBox_List_2017.csv`` (also .gz) as columns image, finding, x, y, w, h (pixels)."""
    csv_path = Path(csv_path)
    boxes = _read_table(csv_path, header=0)
    if boxes.shape[1] < 6:
        raise DataSourceError(f"{csv_path}: expected 6 columns (Image Index, Finding Label, x, y, w, h)")
    boxes = boxes.iloc[:, :6]
    boxes.columns = ["image", "finding", "x", "y", "w", "h"]
    boxes = boxes.dropna(subset=["image"])
    boxes[["x", "y", "w", "h"]] = boxes[["x", "y", "w", "h"]].astype(float)
    boxes["finding"] = boxes["finding"].replace({"Infiltrate": "Infiltration"})
    return boxes.reset_index(drop=True)


def _read_table(path: Path, **kwargs: object) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)  # type: ignore[call-overload]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataSourceError(f"{path}: cannot be parsed as CSV ({exc})") from None


def is_csv(path: Path) -> bool:
    """Whether a path names a CSV (``.csv`` or ``.csv.gz``) by its name."""
    return path.name.lower().endswith((".csv", ".csv.gz"))


def _is_nih_csv(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataSourceError(f"{path}: cannot be parsed as CSV ({exc})") from None
    return {"Image Index", "Finding Labels", "Patient ID"} <= set(header)


def _nih_csvs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("Data_Entry_2017*") if is_csv(p))


def _generic_csvs(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and is_csv(p) and p.name != "metadata.csv" and not p.name.startswith("BBox_List")
    )


def _find_csv(folder: Path) -> Path:
    candidates = _nih_csvs(folder) or _generic_csvs(folder)
    if len(candidates) != 1:
        found = [p.name for p in candidates] or "none"
        raise DataSourceError(
            f"{folder}: expected exactly one labels CSV, found {found}; pass the CSV file itself"
        )
    return candidates[0]


def _class_folders(root: Path) -> list[Path]:
    return [
        sub
        for sub in sorted(root.iterdir())
        if sub.is_dir()
        and not sub.name.startswith(".")
        and sub.name not in ("images", "masks")
        and any(p.suffix.lower() in IMAGE_SUFFIXES for p in sub.iterdir())
    ]


def _fill_patient_ids(frame: pd.DataFrame) -> pd.Series:
    """Unknown patients become one patient per image, so grouping never merges strangers."""
    ids = frame["patient_id"].astype("string")
    unknown = ids.isna() | (ids.str.strip() == "")
    if unknown.any():
        log.info("%d images have no patient_id: each is treated as its own patient", int(unknown.sum()))
        ids = ids.where(~unknown, "image:" + frame["path"].astype(str))
    return ids.astype(str)


def _split_findings(cell: str) -> list[str]:
    return [f.strip() for f in cell.split("|") if f.strip() and f.strip() != NO_FINDING]


def _one_hot(classes: np.ndarray, names: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    labels = np.zeros((len(classes), len(names)), dtype=np.float32)
    labels[np.arange(len(classes)), [index[c] for c in classes]] = 1.0
    return labels


def _multi_hot(findings: pd.Series, names: Sequence[str]) -> np.ndarray:
    # Map each distinct cell once: NIH has ~800 distinct combinations for 112k rows.
    codes, uniques = pd.factorize(findings)
    index = {name: i for i, name in enumerate(names)}
    table = np.zeros((len(uniques), len(names)), dtype=np.float32)
    for row, cell in enumerate(uniques):
        for finding in _split_findings(cell):
            table[row, index[finding]] = 1.0
    return table[codes]


def _join_official_split(frame: pd.DataFrame, folder: Path) -> None:
    lists = {"train_val": folder / "train_val_list.txt", "test": folder / "test_list.txt"}
    if not any(p.exists() for p in lists.values()):
        return
    split = pd.Series(pd.NA, index=frame.index, dtype="string")
    for name, path in lists.items():
        if path.exists():
            images = set(path.read_text().split())
            split[frame["image"].isin(images)] = name
    frame["official_split"] = split
