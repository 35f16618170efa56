"""Face fixtures: the LFW stand-in embedded once per session into a temporary cache, and its fixed split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medlens.data.records import RecordTable, load_source
from medlens.data.splits import patient_split
from medlens.faces.embed import EmbeddingBatch, embed_paths

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass
class LFWSplit:
    """The photos with a face, their embeddings and class names, and a fixed photo-disjoint split."""

    table: RecordTable
    embeddings: np.ndarray
    names: np.ndarray
    train: np.ndarray
    test: np.ndarray


@pytest.fixture(scope="session")
def lfw(shared_data: Path) -> Path:
    return shared_data / "faces-lfw15"


@pytest.fixture(scope="session")
def face_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("face-embedding-cache")


@pytest.fixture(scope="session")
def lfw_batch(lfw: Path, face_cache: Path) -> tuple[RecordTable, EmbeddingBatch]:
    """All 499 photos embedded once (~50 s on 2 cores); later embeds of these photos hit ``face_cache``."""
    table = load_source(lfw)
    return table, embed_paths(table.paths, cache_dir=face_cache, progress=False)


@pytest.fixture(scope="session")
def lfw_split(lfw_batch: tuple[RecordTable, EmbeddingBatch]) -> LFWSplit:
    """Stratified 80/20 split of the photos with a face; each photo is its own patient, the class is the person."""
    table, batch = lfw_batch
    kept = table.subset(np.flatnonzero(batch.has_face))
    names = np.asarray(kept.label_names)[kept.labels.argmax(axis=1)]
    split = patient_split(kept, {"train": 1 - TEST_FRACTION, "test": TEST_FRACTION}, seed=SPLIT_SEED)
    return LFWSplit(kept, batch.embeddings[batch.has_face], names, split["train"], split["test"])


@pytest.fixture(scope="session")
def tiny_faces(lfw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder per class of 2 people x 5 photos, as symlinks to the shared photos (nothing copied)."""
    root = tmp_path_factory.mktemp("tiny-faces")
    for person in ("Tony_Blair", "Serena_Williams"):
        (root / person).mkdir()
        for photo in sorted((lfw / person).glob("*.jpg"))[:5]:
            (root / person / photo.name).symlink_to(photo)
    return root
