"""Every head through the estimator contract, calibrated probabilities, and pickle-free save/reload."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from medlens.errors import CheckpointError, ConfigError
from medlens.evaluation.metrics import multiclass_metrics
from medlens.models.heads import HEADS, create_head, list_heads, load_head, save_head, top_k

CLASSES = ["Apert", "Down", "Williams"]


def _clusters(n_per_class=20, classes=CLASSES, seed=0):
    """Unit-length embeddings around one random centre per class, like dlib descriptors of three people."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), 128))
    x = np.vstack([c + 0.6 * rng.normal(size=(n_per_class, 128)) for c in centres])
    y = np.repeat(classes, n_per_class)
    return x.astype(np.float32), y


def _fast(name):
    return create_head(name, max_iter=300) if name == "mlp" else create_head(name)


def test_the_registry_holds_the_three_heads():
    assert list_heads() == ["svm", "logreg", "mlp", "knn"]
    with pytest.raises(ConfigError, match="svm, logreg, mlp, knn"):
        create_head("random_forest")
    with pytest.raises(ConfigError, match="valid parameters: C"):
        create_head("svm", kernel="rbf")


@pytest.mark.parametrize("name", list(HEADS))
def test_estimator_contract(name):
    x, y = _clusters()
    head = _fast(name)
    assert not [a for a in vars(head) if a.endswith("_")], "no learned state before fit"
    with pytest.raises(ValueError, match="not fitted"):
        head.predict_proba(x)
    assert head.fit(x, y) is head
    assert head.classes_.tolist() == CLASSES and head.n_features_in_ == 128 and head.temperature_ > 0
    proba = head.predict_proba(x)
    assert proba.shape == (len(x), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert (head.predict(x) == head.classes_[proba.argmax(axis=1)]).all()
    assert head.score(x, y) > 0.95
    fresh = clone(head)
    assert type(fresh) is type(head) and fresh.get_params() == head.get_params()
    assert not hasattr(fresh, "classes_")
    assert head.set_params(seed=3) is head and head.seed == 3
    with pytest.raises(ValueError, match="no parameter"):
        head.set_params(gamma=1)


@pytest.mark.parametrize("name", list(HEADS))
def test_two_classes_and_integer_labels(name):
    x, y = _clusters(classes=["a", "b"])
    codes = (y == "b").astype(int)
    head = _fast(name).fit(x, codes)
    assert head.classes_.tolist() == [0, 1]
    proba = head.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert head.score(x, codes) > 0.95


@pytest.mark.parametrize("name", list(HEADS))
def test_save_and_reload_without_pickle(name, tmp_path, monkeypatch):
    x, y = _clusters()
    head = _fast(name).fit(x, y)
    folder = save_head(head, tmp_path / name, {"note": "test"})
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["labels"] == CLASSES and manifest["model"]["head"] == name and manifest["note"] == "test"

    def refuse(*args, **kwargs):
        raise AssertionError("loading a head must not unpickle")

    for module, function in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, function, refuse)
    reloaded = load_head(folder)
    assert type(reloaded) is type(head) and reloaded.get_params() == json.loads(json.dumps(head.get_params()))
    np.testing.assert_allclose(reloaded.predict_proba(x), head.predict_proba(x), rtol=0, atol=1e-6)
    assert reloaded.classes_.tolist() == CLASSES and reloaded.temperature_ == head.temperature_


def test_loading_another_kind_of_checkpoint_is_refused(tmp_path):
    from medlens.models.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "cnn", torch.nn.Linear(2, 2), {"model": {"name": "resnet50"}, "labels": ["a", "b"]})
    with pytest.raises(CheckpointError, match="not a face embedding head"):
        load_head(tmp_path / "cnn")


def test_embeddings_without_a_face_are_refused():
    x, y = _clusters()
    x[3] = np.nan
    with pytest.raises(ValueError, match="1 embeddings hold NaN"):
        create_head("svm").fit(x, y)


def test_out_of_fold_temperature_softens_overconfident_margins():
    x, y = _clusters(seed=1)
    calibrated = create_head("svm").fit(x, y)
    raw = create_head("svm", calibration_folds=0).fit(x, y)
    assert raw.temperature_ == 1.0 and calibrated.temperature_ != 1.0
    np.testing.assert_array_equal(calibrated.predict(x), raw.predict(x))


def test_top_k_orders_rows_and_breaks_ties_by_column():
    proba = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    assert top_k(proba, 2, ["a", "b", "c"]) == [[("b", 0.6), ("c", 0.3)], [("a", 0.4), ("c", 0.4)]]
    assert top_k(proba[0], 5) == [[(1, 0.6), (2, 0.3), (0, 0.1)]]
    with pytest.raises(ValueError, match="2 class names"):
        top_k(proba, 1, ["a", "b"])


@pytest.mark.shared
def test_svm_top1_at_least_090_on_a_photo_disjoint_lfw_split(lfw_split):
    s = lfw_split
    train_paths, test_paths = set(s.table.frame["path"].iloc[s.train]), set(s.table.frame["path"].iloc[s.test])
    assert not train_paths & test_paths and len(train_paths) + len(test_paths) == len(s.table)
    assert set(s.names[s.test]) == set(s.names)  # stratified: every person in the test part
    head = create_head("svm").fit(s.embeddings[s.train], s.names[s.train])
    proba = head.predict_proba(s.embeddings[s.test])
    truth = s.table.subset(s.test).relabel(head.classes_.tolist()).labels
    metrics = multiclass_metrics(truth, proba, head.classes_.tolist())
    print(f"svm: top-1 {metrics['accuracy']:.3f}, top-5 {metrics['top_k']['top_5']:.3f} on {len(s.test)} photos")
    assert metrics["accuracy"] >= 0.9


@pytest.mark.shared
@pytest.mark.parametrize("name", ["logreg", "mlp", "knn"])
def test_other_heads_on_the_same_split(lfw_split, name):
    s = lfw_split
    head = create_head(name).fit(s.embeddings[s.train], s.names[s.train])
    accuracy = head.score(s.embeddings[s.test], s.names[s.test])
    print(f"{name}: top-1 {accuracy:.3f}")
    assert accuracy >= 0.9
