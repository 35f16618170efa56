"""What every embedder shares: the frame it describes in an image, and embeddings cached by image content,
so a probe's head (or another head) is fitted again in seconds.

One ``.npz`` per embedder setting (``FOLDER/<tag>.npz``: a face detector's settings, a backbone's weights
and preprocessing) holds, per image file's SHA-256, its vector and a count (faces found; 1 for a backbone),
images without an embedding included. Renamed or copied images still hit it, an edited one never does; the
file is replaced atomically, and a damaged one is started again, not fatal.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ImageReadError
from medlens.io import file_sha256 as sha256_of

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, or :class:`ImageReadError` naming the file."""
    try:
        return sha256_of(path)
    except OSError as exc:
        raise ImageReadError(str(path), f"cannot be read ({exc.strerror or exc})") from None


@dataclass
class Frame:
    """What an embedder describes in one image: a face's aligned chip, or the model-size image a backbone sees."""

    image: np.ndarray
    """uint8: what is embedded, and what an occlusion map is computed over."""
    marks: np.ndarray | None = None
    """Points to draw over ``image`` (a face's 68 landmarks in chip pixels); None for a backbone."""
    details: dict[str, Any] = field(default_factory=dict)
    """What was found beside the image (a face model: ``n_faces``, ``box``, ``landmarks`` in image pixels)."""


class EmbeddingCache:
    """Vectors by image SHA-256 for one embedder setting, in ``FOLDER/<tag>.npz``; ``about`` is recorded in it."""

    def __init__(self, folder: str | Path, tag: str, about: dict[str, Any] | None = None):
        self.path = Path(folder) / f"{tag}.npz"
        self.about = about or {}
        self._rows: dict[str, tuple[np.ndarray, int]] = {}
        self._dirty = False
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                keys, vectors, counts = stored["keys"], stored["embeddings"], stored["n_faces"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable embedding cache (%s); starting an empty one", self.path, exc)
            return
        self._rows = {str(k): (v, int(n)) for k, v, n in zip(keys, vectors, counts, strict=True)}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, sha256: str) -> tuple[np.ndarray, int] | None:
        """(vector, count) for an image hash, or None when it was never embedded."""
        return self._rows.get(sha256)

    def put(self, sha256: str, vector: np.ndarray, count: int) -> None:
        self._rows[sha256] = (np.asarray(vector, dtype=np.float32), int(count))
        self._dirty = True

    def save(self) -> None:
        """Write the cache atomically (a temporary sibling renamed over it); a no-op when nothing changed."""
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._rows)
        tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}.npz")
        np.savez(
            tmp,
            keys=np.array(keys, dtype=str),
            embeddings=np.stack([self._rows[k][0] for k in keys]).astype(np.float32),
            n_faces=np.array([self._rows[k][1] for k in keys], dtype=np.int32),
            settings=np.array(json.dumps(self.about)),
        )
        os.replace(tmp, self.path)
        self._dirty = False
