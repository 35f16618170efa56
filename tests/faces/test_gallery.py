"""Gallery matching: classes added and removed without training, and people no head was trained on."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.evaluation.metrics import top_k_accuracy
from medlens.faces.gallery import FaceGallery
from medlens.models.heads import UnknownClassError, create_head

GALLERY_PHOTOS = 5


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_add_and_remove_classes_change_the_ranking_without_training():
    gallery = FaceGallery(k=2)
    gallery.add_class("Down", _unit([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]]))
    gallery.add_class("Williams", _unit([[0.0, 1.0, 0.0]]))
    query = _unit([0.2, 0.1, 1.0])
    assert [name for name, _ in gallery.rank(query)] == ["Down", "Williams"]

    gallery.add_class("Sotos", _unit([[0.1, 0.0, 1.0]]))
    ranked = gallery.rank(query)
    assert ranked[0][0] == "Sotos" and ranked[0][1] == pytest.approx(float(_unit([0.1, 0, 1]) @ query))
    assert len(gallery) == 3 and "Sotos" in gallery

    gallery.remove_class("Sotos")
    assert [name for name, _ in gallery.rank(query)] == ["Down", "Williams"]
    with pytest.raises(UnknownClassError, match="Down, Williams"):
        gallery.remove_class("Sotos")


def test_class_score_is_the_mean_of_the_k_best_similarities():
    gallery = FaceGallery(k=2)
    gallery.add_class("a", _unit([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    query = _unit([1.0, 0.0])
    assert gallery.scores(query)[0, 0] == pytest.approx((1.0 + np.sqrt(0.5)) / 2)
    gallery.add_class("a", _unit([[1.0, 0.01]]))  # more photos of a class already there
    assert gallery.size("a") == 4 and gallery.scores(query)[0, 0] > 0.99
    with pytest.raises(ValueError, match="at least 1"):
        FaceGallery(k=0)
    with pytest.raises(ValueError, match="empty"):
        FaceGallery().scores(query)
    with pytest.raises(ValueError, match="features"):
        gallery.add_class("b", np.ones((1, 3)))


@pytest.mark.shared
def test_gallery_on_the_lfw_split(lfw_split):
    s = lfw_split
    gallery = FaceGallery()
    for name in np.unique(s.names[s.train]):
        gallery.add_class(name, s.embeddings[s.train][s.names[s.train] == name])
    scores = gallery.scores(s.embeddings[s.test])
    truth = np.array([gallery.classes.index(n) for n in s.names[s.test]])
    top1, top5 = top_k_accuracy(truth, scores, 1), top_k_accuracy(truth, scores, 5)
    print(f"gallery (mean of top-3 cosine): top-1 {top1:.3f}, top-5 {top5:.3f}")
    assert top1 >= 0.9


@pytest.mark.shared
def test_people_held_out_of_training_are_matched_from_a_few_gallery_photos(lfw_split):
    """A head trained on 10 people cannot name the other 5; the gallery can, once given 5 photos of each."""
    s = lfw_split
    people = sorted(set(s.names))
    seen, unseen = people[:10], people[10:]
    train = np.isin(s.names, seen)
    head = create_head("svm").fit(s.embeddings[train], s.names[train])
    assert set(head.classes_) == set(seen)

    gallery = FaceGallery()
    for name in seen:
        gallery.add_class(name, s.embeddings[s.names == name])
    queries, truth = [], []
    for name in unseen:
        rows = np.flatnonzero(s.names == name)
        gallery.add_class(name, s.embeddings[rows[:GALLERY_PHOTOS]])
        queries.extend(rows[GALLERY_PHOTOS:])
        truth.extend([gallery.classes.index(name)] * (len(rows) - GALLERY_PHOTOS))
    scores = gallery.scores(s.embeddings[queries])
    top1, top5 = top_k_accuracy(np.array(truth), scores, 1), top_k_accuracy(np.array(truth), scores, 5)
    print(f"held-out people ({len(queries)} photos, 15 classes): top-1 {top1:.3f}, top-5 {top5:.3f}")
    assert top1 >= 0.85
    ranked = gallery.rank(s.embeddings[queries[0]])
    assert len(ranked) == 15 and ranked[0][0] == unseen[0]
