"""dlib's pretrained 128-d face descriptors, cached per image so re-training a head takes seconds.

The descriptor is computed from the aligned chip (dlib's ResNet, trained for face identity, offline). The
cache is keyed by the SHA-256 of each image file's bytes, so renamed or copied photos still hit it and an
edited photo never does. One ``.npz`` per detector setting (the descriptor depends on the alignment) holds
the keys, descriptors and face counts, photos without a face included, and is replaced atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from medlens.data.readers import ImageSource
from medlens.faces.detect import (
    DEFAULT_SETTINGS,
    DetectedFace,
    FacesConfig,
    NoFaceError,
    detect_face,
    load_rgb,
)
from medlens.faces.dlib_models import descriptor_model
from medlens.models.embedding import EmbeddingCache, Frame, file_sha256

log = logging.getLogger(__name__)

EMBEDDING_SIZE = 128
EMBEDDER = "dlib_face_recognition_resnet_model_v1"
STEPS = ("read", "detect", "align", "embed")


@dataclass
class FaceEmbedding:
    """One photo's descriptor and the face it came from."""

    vector: np.ndarray
    face: DetectedFace
    seconds_embed: float


@dataclass
class EmbeddingBatch:
    """Descriptors of many photos, in their order; rows of photos without a face are NaN."""

    paths: list[Path]
    embeddings: np.ndarray
    """N x 128 float32."""
    n_faces: np.ndarray
    """Faces found per photo; 0 means none (and a NaN row)."""
    from_cache: np.ndarray
    """Which rows the cache answered."""
    ms_per_image: dict[str, float]
    """Mean milliseconds per computed photo for each of read, detect, align, embed (empty if all cached)."""

    @property
    def has_face(self) -> np.ndarray:
        return self.n_faces > 0

    @property
    def no_face(self) -> list[Path]:
        return [p for p, n in zip(self.paths, self.n_faces, strict=True) if n == 0]


def embed_chips(chips: Sequence[np.ndarray]) -> np.ndarray:
    """Descriptors (N x 128 float32) of aligned uint8 RGB face chips, computed as one batch."""
    if not chips:
        return np.empty((0, EMBEDDING_SIZE), dtype=np.float32)
    vectors = descriptor_model().compute_face_descriptor([np.ascontiguousarray(c, dtype=np.uint8) for c in chips])
    return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32)


def embed_face(
    source: ImageSource | np.ndarray, settings: FacesConfig = DEFAULT_SETTINGS, *, name: str | None = None
) -> FaceEmbedding:
    """Detect, align and describe the largest face of one photo; :class:`NoFaceError` when there is none."""
    face = detect_face(source, settings, name=name)
    started = time.perf_counter()
    vector = embed_chips([face.chip])[0]
    return FaceEmbedding(vector, face, time.perf_counter() - started)


def face_cache(folder: str | Path, settings: FacesConfig = DEFAULT_SETTINGS) -> EmbeddingCache:
    """The cache of descriptors for one detector setting, ``FOLDER/<settings.tag>.npz``."""
    return EmbeddingCache(folder, settings.tag, {**settings.to_dict(), "embedder": EMBEDDER})


def embed_paths(
    paths: Sequence[str | Path],
    settings: FacesConfig = DEFAULT_SETTINGS,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> EmbeddingBatch:
    """Descriptors of many photos, read from and added to the cache in ``cache_dir`` when one is given.

    Photos without a face get a NaN row and ``n_faces == 0`` (and are cached as such); an unreadable photo
    raises :class:`ImageReadError` after the work done so far is saved to the cache.
    """
    paths = [Path(p) for p in paths]
    cache = face_cache(cache_dir, settings) if cache_dir is not None else None
    embeddings = np.full((len(paths), EMBEDDING_SIZE), np.nan, dtype=np.float32)
    n_faces = np.zeros(len(paths), dtype=np.int64)
    from_cache = np.zeros(len(paths), dtype=bool)
    totals = dict.fromkeys(STEPS, 0.0)
    computed = 0
    try:
        for i, path in enumerate(tqdm(paths, desc="embedding faces", unit="img", disable=not progress)):
            key = file_sha256(path) if cache is not None else ""
            hit = cache.get(key) if cache is not None else None
            if hit is None:
                hit = _embed_for_batch(path, settings, totals)
                computed += 1
                if cache is not None:
                    cache.put(key, *hit)
            else:
                from_cache[i] = True
            embeddings[i], n_faces[i] = hit
    finally:
        if cache is not None:
            cache.save()
    log.info(
        "embedded %d photos (%d from the cache): %d without a face, %d with several (the largest used)",
        len(paths),
        int(from_cache.sum()),
        int((n_faces == 0).sum()),
        int((n_faces > 1).sum()),
    )
    ms = {step: 1000.0 * total / computed for step, total in totals.items()} if computed else {}
    return EmbeddingBatch(paths, embeddings, n_faces, from_cache, ms)


def _embed_for_batch(path: Path, settings: FacesConfig, totals: dict[str, float]) -> tuple[np.ndarray, int]:
    """(descriptor, face count) of one photo, adding each step's time to ``totals``; NaN and 0 for no face."""
    started = time.perf_counter()
    image, label = load_rgb(path)
    read = time.perf_counter()
    totals["read"] += read - started
    try:
        found = embed_face(image, settings, name=label)
    except NoFaceError:
        totals["detect"] += time.perf_counter() - read
        return np.full(EMBEDDING_SIZE, np.nan, dtype=np.float32), 0
    for step, seconds in {**found.face.seconds, "embed": found.seconds_embed}.items():
        totals[step] += seconds
    return found.vector, found.face.n_faces


class FaceEmbedder:
    """dlib's face descriptor as an embedder: each photo's largest face, found and aligned as ``settings`` say.

    A photo without a face has no embedding: its row is NaN and its problem ``no_face``.
    """

    name = "dlib_face"
    channels = 3
    inputs = "face-photo"
    size = EMBEDDING_SIZE
    no_frame = "no face found"
    no_frame_code = "no_face"
    no_frame_error = NoFaceError
    no_frame_details: ClassVar[dict[str, Any]] = {"n_faces": 0}

    def __init__(self, settings: FacesConfig = DEFAULT_SETTINGS):
        self.settings = settings

    def spec(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this embedder."""
        return {"name": self.name, "model": EMBEDDER, "size": self.size, "faces": self.settings.to_dict()}

    @property
    def cache_tag(self) -> str:
        return self.settings.tag

    def frame(self, pixels: np.ndarray, name: str | None = None) -> Frame:
        """The largest face of a photo, aligned; :class:`NoFaceError` when there is none."""
        face = detect_face(pixels, self.settings, name=name)
        details = {"n_faces": face.n_faces, "box": list(face.box), "landmarks": face.landmarks}
        return Frame(face.chip, face.chip_landmarks, details)

    def embed_frames(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (N x 128) of aligned chips."""
        return embed_chips(images)

    def embed_paths(
        self, paths: Sequence[str | Path], cache_dir: str | Path | None = None, progress: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Descriptors of photo files (NaN rows without a face), cached by file hash in ``cache_dir``, and each
        photo's ``n_faces``."""
        batch = embed_paths(paths, self.settings, cache_dir=cache_dir, progress=progress)
        if batch.ms_per_image:
            log.info("ms per photo: %s", ", ".join(f"{step} {ms:.1f}" for step, ms in batch.ms_per_image.items()))
        return batch.embeddings, [{"n_faces": int(n)} for n in batch.n_faces]
