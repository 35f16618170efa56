"""Readers, record tables, splits, the preprocessing cache and the synthetic phantoms."""

from medlens.data.readers import ImageReadError, load_image, read_image
from medlens.data.records import RecordTable, load_source

__all__ = ["ImageReadError", "RecordTable", "load_image", "load_source", "read_image"]
