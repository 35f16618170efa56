"""Probes on any backbone: frozen features cached by image and weights, a classical head regularised by
patient-grouped CV and calibrated on validation, and a checkpoint every job takes like any other."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_run

from medlens.cli import main
from medlens.config import load_config
from medlens.evaluation.metrics import apply_temperature, expected_calibration_error
from medlens.inference import ProbeModel, load_model
from medlens.jobs.train import train
from medlens.models import embedders
from medlens.models.checkpoint import load_weights, read_manifest

PROBE = ("model.strategy=probe", "data.phantoms.task=multiclass", "data.phantoms.n=80", "data.image_size=32")


def _config(*extra: str):
    return load_config(None, tiny_run(*PROBE, *extra))


@pytest.fixture(scope="module")
def logreg_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("probe") / "run"
    scores = train(_config("model.probe=logreg", f"data.cache={run.parent / 'embeddings'}"), run, progress=False)
    return run, scores


def test_a_probe_checkpoint_keeps_its_backbone_and_says_what_it_chose(logreg_run):
    run, scores = logreg_run
    manifest = read_manifest(run / "best")
    assert manifest["kind"] == "probe" and manifest["embedder"]["name"] == "backbone"
    assert manifest["embedder"]["model"]["name"] == "tiny" and manifest["embedder"]["weights"]["sha256"]
    assert manifest["regularisation"]["parameter"] == "C" and set(manifest["regularisation"]["cv_balanced_accuracy"])
    weights = load_weights(run / "best")
    assert any(k.startswith("embedder.") for k in weights) and {"coef_", "intercept_"} <= set(weights)
    assert 0.0 <= scores["val_accuracy"] <= 1.0 and manifest["temperature"] > 0


def test_its_probabilities_are_calibrated_on_validation(logreg_run):
    run, _ = logreg_run
    model = load_model(run)
    splits = pd.read_csv(run / "splits.csv")
    val = [run / "phantoms" / p for p in splits.loc[splits["split"] == "val", "path"]]
    truth = np.eye(len(model.labels))[[model.labels.index(p.parent.name) for p in val]]
    logits = model.logits_paths(val).values
    raw = expected_calibration_error(truth, apply_temperature(logits, 1.0, "multiclass"), "multiclass")
    calibrated = expected_calibration_error(truth, model.probabilities(logits), "multiclass")
    assert model.temperature != 1.0 and calibrated <= raw + 1e-9


def test_every_job_takes_the_probe(logreg_run, tmp_path, capsys):
    run, _ = logreg_run
    model = load_model(run)
    assert isinstance(model, ProbeModel) and model.cam_methods[0] == "gradcam" and "occlusion" in model.cam_methods
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--resamples", "20"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "multiclass" and metrics["n_left_out"] == 0
    images = sorted((run / "phantoms").glob("*/*.png"))[:3]
    assert main(["predict", str(run), *map(str, images), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 3
    for method in ("gradcam", "occlusion"):
        out = tmp_path / method
        assert main(["explain", str(run), str(images[0]), "--out", str(out), "--method", method]) == 0
        (heat,) = list(out.glob("*.npy"))
        found = np.load(heat)
        assert found.shape == (32, 32) and np.isfinite(found).all()  # at the model size, as for networks
    capsys.readouterr()


def test_a_knn_probe_explains_by_occlusion_and_the_cache_spares_the_backbone(logreg_run, tmp_path, monkeypatch):
    run, _ = logreg_run
    calls = {"frames": 0}
    embed = embedders.BackboneEmbedder.embed_frames

    def counted(self, images):
        calls["frames"] += len(images)
        return embed(self, images)

    monkeypatch.setattr(embedders.BackboneEmbedder, "embed_frames", counted)
    knn = train(_config("model.probe=knn", f"data.cache={run.parent / 'embeddings'}"), tmp_path / "knn", progress=False)
    assert calls["frames"] == 0, "the same images and weights were embedded again"
    model = load_model(tmp_path / "knn")
    assert model.cam_methods == ("occlusion",) and read_manifest(tmp_path / "knn")["regularisation"]["parameter"] == "k"
    assert 0.0 <= knn["val_accuracy"] <= 1.0
