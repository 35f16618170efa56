"""The one image-file collector: what ``predict``, ``explain``, ``export`` and study reports take as inputs.

Inputs are image files, folders (searched recursively, in sorted order) and data-source CSVs (their
images, in the CSV's order); each must exist, and a folder must hold at least one image.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medlens.data.readers import IMAGE_SUFFIXES
from medlens.data.records import is_csv, load_source
from medlens.errors import DataSourceError


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files from files, folders and data-source CSVs, in a stable order; DataSourceError naming a
    missing input, an image-less folder, or no input at all."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            inside = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise DataSourceError(f"{item}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
            found += inside
        elif item.is_file() and is_csv(item):
            found += load_source(item).paths
        elif item.is_file():
            found.append(item)
        else:
            raise DataSourceError(f"{item} does not exist")
    if not found:
        raise DataSourceError("no images given: name image files, folders or a data CSV")
    return found

