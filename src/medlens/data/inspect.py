"""What is in a data source: counts per label, patients, views, missing and unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medlens.data.readers import read_image, sniff_format
from medlens.data.records import RecordTable
from medlens.errors import ImageReadError


def summarize(table: RecordTable, decode: bool = False, progress: bool = False) -> dict[str, object]:
    """A JSON-ready summary of ``table``.

    Files are checked for presence and for a PNG/JPEG/DICOM signature; ``decode=True`` decodes every
    image fully instead (slow on large sets). Absent images are counted as missing, so metadata without
    its images (the full NIH CSV) still summarises.
    """
    labels = table.labels
    per_patient = table.frame.groupby("patient_id").size()
    missing, unreadable = [], []
    for path in tqdm(table.paths, desc="checking files", unit="img", disable=not progress):
        problem = _file_problem(path, decode)
        if problem == "missing":
            missing.append(str(path))
        elif problem is not None:
            unreadable.append(f"{path}: {problem}")
    summary: dict[str, object] = {
        "source": str(table.root),
        "format": table.kind,
        "task": table.task,
        "n_images": len(table),
        "n_patients": int(per_patient.size),
        "images_per_patient": {
            "mean": round(float(per_patient.mean()), 3) if len(per_patient) else 0.0,
            "max": int(per_patient.max()) if len(per_patient) else 0,
        },
        "labels": {name: int(np.nansum(labels[:, j])) for j, name in enumerate(table.label_names)},
        "unknown_labels": int(np.isnan(labels).sum()),
        "n_missing": len(missing),
        "n_unreadable": len(unreadable),
        "missing_examples": missing[:5],
        "unreadable_examples": unreadable[:5],
    }
    if table.task == "multilabel":
        summary["no_finding"] = int(np.all(labels == 0, axis=1).sum())
    for column in ("view", "sex", "source"):
        if column in table.frame.columns:
            counts = table.frame[column].fillna("unknown").astype(str).value_counts()
            summary[f"{column}_counts"] = {k: int(v) for k, v in counts.items()}
    return summary


def _file_problem(path: Path, decode: bool) -> str | None:
    if not path.is_file():
        return "missing"
    if decode:
        try:
            read_image(path)
        except ImageReadError as exc:
            return exc.problem
        return None
    with path.open("rb") as handle:
        head = handle.read(132)
    if not head:
        return "empty file"
    return None if sniff_format(head) else "not a PNG, JPEG or DICOM file"


def format_summary(summary: dict[str, object]) -> str:
    """The summary as a short human-readable table."""
    lines = [
        f"source      {summary['source']} ({summary['format']}, {summary['task']})",
        f"images      {summary['n_images']}",
        f"patients    {summary['n_patients']} "
        f"(images per patient: mean {summary['images_per_patient']['mean']}, "  # type: ignore[index]
        f"max {summary['images_per_patient']['max']})",  # type: ignore[index]
        f"missing     {summary['n_missing']}",
        f"unreadable  {summary['n_unreadable']}",
        "labels:",
    ]
    counts: dict[str, int] = summary["labels"]  # type: ignore[assignment]
    width = max((len(k) for k in counts), default=0)
    total = max(int(summary["n_images"]), 1)  # type: ignore[call-overload]
    lines += [f"  {name:<{width}}  {n:>7}  {100 * n / total:5.1f}%" for name, n in counts.items()]
    if "no_finding" in summary:
        lines.append(f"  {'(no finding)':<{width}}  {summary['no_finding']:>7}")
    for key in ("view_counts", "sex_counts", "source_counts"):
        if key in summary:
            shown = ", ".join(f"{k} {v}" for k, v in summary[key].items())  # type: ignore[attr-defined]
            lines.append(f"{key.removesuffix('_counts'):<11} {shown}")
    return "\n".join(lines)
