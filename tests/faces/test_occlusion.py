"""Occlusion maps for any scorer of images (a head over embeddings here), landmarks drawn on the chip, PNG out."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from medlens.explain.occlusion import draw_landmarks, explanation_image, occlusion_map, png_bytes
from medlens.faces.detect import detect_face
from medlens.faces.embed import embed_chips
from medlens.models.heads import create_head

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def face(lfw):
    return detect_face(lfw / "Tony_Blair" / "Tony_Blair_0004.jpg")


@pytest.fixture(scope="module")
def svm(lfw_split):
    return create_head("svm").fit(lfw_split.embeddings[lfw_split.train], lfw_split.names[lfw_split.train])


def _scorer(head):
    return lambda chips: head.predict_proba(embed_chips(chips))


def test_map_has_the_chip_shape_and_explains_the_top_class(face, svm):
    found = occlusion_map(face.chip, _scorer(svm), patch_size=50, stride=50)
    assert found.heatmap.shape == (150, 150) and found.heatmap.dtype == np.float32
    assert np.isfinite(found.heatmap).all() and np.ptp(found.heatmap) > 0
    assert svm.classes_[found.target] == "Tony_Blair" and found.probability > 0.5
    # 3 x 3 patches tile the chip: each pixel holds exactly its one patch's drop.
    assert len(np.unique(found.heatmap)) <= 9


def test_any_head_with_predict_proba_and_a_chosen_target(face, lfw_split):
    knn = KNeighborsClassifier(n_neighbors=5).fit(lfw_split.embeddings, lfw_split.names)
    target = list(knn.classes_).index("Serena_Williams")
    found = occlusion_map(face.chip, _scorer(knn), target, patch_size=75, stride=75)
    assert found.target == target and found.heatmap.shape == (150, 150)
    with pytest.raises(ValueError, match="patch_size"):
        occlusion_map(face.chip, _scorer(knn), patch_size=200)


def test_landmarks_drawn_and_written_as_png(face):
    drawn = draw_landmarks(face.chip, face.chip_landmarks)
    assert drawn.shape == face.chip.shape and not np.array_equal(drawn, face.chip)
    picture = explanation_image(face.chip, np.random.default_rng(0).random((150, 150)), face.chip_landmarks)
    assert picture.shape == (300, 300, 3)
    png = png_bytes(picture)
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (300, 300)
