"""Nearest-neighbour matching against per-class galleries: classes come and go without training.

A gallery holds a few embeddings per class (e.g. confirmed photos of a newly described syndrome). A query's
score for a class is the mean of its ``k`` highest cosine similarities to that class's photos (all of them
when the class has fewer than ``k``): ``k=1`` is the plain nearest neighbour (the max), a larger ``k``
asks a class to be close in several photos, not one look-alike. Scores are in [-1, 1] and are similarities,
not probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medlens.models.heads import UnknownClassError, unit_rows


class FaceGallery:
    """Per-class embedding galleries ranked by cosine similarity; see the module docstring for scores."""

    def __init__(self, k: int = 3):
        if k < 1:
            raise ValueError(f"k (similarities averaged per class) must be at least 1, got {k}")
        self.k = k
        self._galleries: dict[str, np.ndarray] = {}

    @property
    def classes(self) -> list[str]:
        return list(self._galleries)

    def __len__(self) -> int:
        return len(self._galleries)

    def __contains__(self, name: object) -> bool:
        return name in self._galleries

    def size(self, name: str) -> int:
        """How many photos the class's gallery holds."""
        return len(self._gallery(name))

    def add_class(self, name: str, embeddings: Any) -> None:
        """Add photos of class ``name`` (N x D, or one D vector); a class already present gains them."""
        vectors = unit_rows(np.atleast_2d(embeddings))
        if self._galleries:
            width = next(iter(self._galleries.values())).shape[1]
            if vectors.shape[1] != width:
                raise ValueError(f"class {name!r}: embeddings have {vectors.shape[1]} features, the gallery {width}")
        if name in self._galleries:
            vectors = np.vstack([self._galleries[name], vectors])
        self._galleries[name] = vectors

    def remove_class(self, name: str) -> None:
        self._gallery(name)
        del self._galleries[name]

    def scores(self, embeddings: Any) -> np.ndarray:
        """Class scores (N x K, columns in :attr:`classes` order) of N query embeddings."""
        if not self._galleries:
            raise ValueError("the gallery is empty: add_class(name, embeddings) first")
        queries = unit_rows(np.atleast_2d(embeddings))
        columns = []
        for gallery in self._galleries.values():
            similarity = queries @ gallery.T
            k = min(self.k, gallery.shape[0])
            columns.append(np.sort(similarity, axis=1)[:, -k:].mean(axis=1))
        return np.stack(columns, axis=1)

    def rank(self, embedding: Any) -> list[tuple[str, float]]:
        """Every class with its score for one embedding, best first (ties: the class added first)."""
        row = self.scores(np.asarray(embedding, dtype=np.float64).reshape(1, -1))[0]
        order = np.argsort(-row, kind="stable")
        return [(self.classes[j], float(row[j])) for j in order]

    def _gallery(self, name: str) -> np.ndarray:
        if name not in self._galleries:
            raise UnknownClassError(f"no class {name!r} in the gallery; it holds: {', '.join(self.classes) or 'none'}")
        return self._galleries[name]
