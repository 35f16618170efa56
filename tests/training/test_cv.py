"""Cross-validation and fold ensembles: folds, out-of-fold metrics, resume, and the ensemble as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import METRICS_JSON_KEYS, short_real_run, tiny_run

import medlens.jobs.cv as cv
from medlens.cli import main
from medlens.config import load_config
from medlens.configs import find_config
from medlens.data.records import load_source
from medlens.errors import MedlensError
from medlens.explain.cam import CamExplainer
from medlens.inference import load_model
from medlens.jobs.cv import cross_validate
from medlens.models import create_model
from medlens.models.checkpoint import read_manifest
from medlens.models.ensemble import Ensemble
from medlens.serve.schemas import Limits
from medlens.serve.service import PredictOptions, load_served_model

K = 3
TINY = tiny_run("train.epochs=1")


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cv") / "run"
    cross_validate(load_config(None, TINY), run, K, progress=False, n_resamples=20)
    return run


def _images(run: Path, n: int = 4) -> list[Path]:
    return sorted((run / "phantoms").rglob("*.png"))[:n]


def _check_folds(folds: pd.DataFrame, n_images: int, k: int) -> None:
    """Each patient in one split; every image in exactly one of the folds or the test split."""
    assert (folds.groupby("patient_id")["split"].nunique() == 1).all()
    assert folds["path"].is_unique and len(folds) == n_images
    assert set(folds["split"]) - {"test"} == {f"fold{i}" for i in range(k)}


def test_folds_are_patient_disjoint_and_cover_every_image_once(cv_run):
    folds = pd.read_csv(cv_run / cv.FOLDS_FILE, dtype=str)
    _check_folds(folds, len(load_source(cv_run / "phantoms")), K)
    for i in range(K):
        fold = pd.read_csv(cv_run / f"fold{i}" / "splits.csv", dtype=str)
        assert set(fold.loc[fold["split"] == "val", "path"]) == set(folds.loc[folds["split"] == f"fold{i}", "path"])
        assert set(fold.loc[fold["split"] == "test", "path"]) == set(folds.loc[folds["split"] == "test", "path"])
        oof = pd.read_csv(cv_run / f"fold{i}" / cv.OOF_FILE)
        assert set(oof["path"]) == set(folds.loc[folds["split"] == f"fold{i}", "path"])


def test_cv_metrics_hold_every_fold_the_pooled_estimate_and_the_spread(cv_run):
    metrics = json.loads((cv_run / cv.CV_METRICS_FILE).read_text())
    assert metrics["k"] == K and len(metrics["folds"]) == K
    assert set(metrics["pooled"]) >= METRICS_JSON_KEYS and set(metrics["folds"][0]["metrics"]) >= METRICS_JSON_KEYS
    assert metrics["pooled"]["n_images"] == sum(f["metrics"]["n_images"] for f in metrics["folds"])
    auc = metrics["summary"]["macro_auc"]
    values = [f["metrics"]["macro_auc"] for f in metrics["folds"]]
    assert auc["folds"] == values and auc["mean"] == pytest.approx(np.mean(values))
    assert auc["sd"] == pytest.approx(np.std(values, ddof=1))
    assert (cv_run / cv.CV_CURVES_FILE).stat().st_size > 0
    assert "mean ± sd" in cv.format_cv(metrics)


def test_ensemble_manifest_describes_itself(cv_run):
    manifest = read_manifest(cv_run / cv.ENSEMBLE_DIR)
    member = read_manifest(cv_run / "fold0" / "best")
    assert manifest["kind"] == "ensemble" and manifest["temperature"] == 1.0
    for key in ("task", "labels", "model", "preprocessing", "data"):
        assert manifest[key] == member[key]
    assert [m["path"] for m in manifest["members"]] == [f"../fold{i}/best" for i in range(K)]
    assert manifest["members"][0]["temperature"] == member["temperature"]
    assert len(manifest["thresholds"]) == len(manifest["labels"]) and "operating_points" in manifest
    # Only what is served is exported: the ensemble, checked on real (phantom) images, not each fold.
    assert manifest["onnx"]["parity_source"] == "real" and (cv_run / cv.ENSEMBLE_DIR / "model.onnx").is_file()
    assert "onnx" not in member and not (cv_run / "fold0" / "best" / "model.onnx").exists()


def test_ensemble_probabilities_are_the_mean_of_its_members(cv_run):
    # The module's arithmetic, so torch on both sides (the ensemble's ONNX export may have measured faster).
    ensemble = load_model(cv_run / cv.ENSEMBLE_DIR, backend="torch")
    members = [load_model(cv_run / f"fold{i}") for i in range(K)]
    paths = _images(cv_run)
    expected = np.mean([m.predict_paths(paths) for m in members], axis=0)
    assert np.allclose(ensemble.predict_paths(paths), expected, atol=1e-6)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_ensemble_module_averages_tempered_probabilities(task):
    torch.manual_seed(0)
    members = [create_model("tiny", num_classes=4).eval() for _ in range(3)]
    temperatures = [0.5, 1.0, 2.0]
    x = torch.randn(2, 1, 48, 48) * 4
    with torch.no_grad():
        logits = Ensemble(members, temperatures, task).eval()(x)
        scaled = [m(x) / t for m, t in zip(members, temperatures, strict=True)]
    if task == "multilabel":
        got, expected = torch.sigmoid(logits), torch.stack([torch.sigmoid(z) for z in scaled]).mean(0)
    else:
        got, expected = torch.softmax(logits, 1), torch.stack([torch.softmax(z, 1) for z in scaled]).mean(0)
    assert torch.isfinite(logits).all()
    assert torch.allclose(got, expected, atol=1e-6)


def test_ensemble_cam_is_the_mean_of_member_cams():
    torch.manual_seed(0)
    members = [create_model("tiny", num_classes=3).eval() for _ in range(2)]
    x = torch.randn(1, 1, 64, 64)
    with CamExplainer(Ensemble(members, [1.0, 1.5], "multilabel")) as explainer:
        got = explainer(x, 1)
    maps = []
    for member in members:
        with CamExplainer(member) as explainer:
            maps.append(explainer(x, 1))
    mean = np.mean(maps, axis=0)
    expected = (mean - mean.min()) / (mean.max() - mean.min())
    assert np.allclose(got, expected, atol=1e-4)


def test_evaluate_predict_explain_and_serve_take_the_ensemble(cv_run, tmp_path, capsys):
    ensemble = str(cv_run / cv.ENSEMBLE_DIR)
    images = [str(p) for p in _images(cv_run, 2)]
    assert main(["evaluate", ensemble, "--out", str(tmp_path / "eval"), "--resamples", "20"]) == 0
    assert "the run's 'test' split" in capsys.readouterr().out
    assert main(["predict", ensemble, *images, "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 2
    assert main(["explain", ensemble, images[0], "--out", str(tmp_path / "cam")]) == 0
    assert list((tmp_path / "cam").glob("*.npy"))
    served = load_served_model(ensemble, Limits(max_upload_bytes=10**7, max_pixels=10**8, request_seconds=60))
    try:
        answer = served.predict(Path(images[0]).read_bytes(), PredictOptions(explain=(served.labels[0],)))
    finally:
        served.close()
    assert len(answer.heatmaps) == 1


def test_resume_skips_finished_folds_and_a_new_run_refuses_the_folder(cv_run, monkeypatch):
    with pytest.raises(MedlensError, match="--resume"):
        cross_validate(load_config(None, TINY), cv_run, K, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(cv, "train", no_training)
    before = json.loads((cv_run / cv.CV_METRICS_FILE).read_text())
    after = cross_validate(load_config(None, TINY), cv_run, K, resume=True, progress=False, n_resamples=20)
    assert after["pooled_headline"] == before["pooled_headline"]


def test_train_folds_from_the_command_line(tmp_path, capsys):
    sets = [a for o in tiny_run("train.epochs=1", "data.phantoms.n=40", "data.phantoms.task=multiclass")
            for a in ("--set", o)]  # fmt: skip
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert main(["train", str(empty), "--folds", "2", "--out", str(tmp_path / "run"), *sets]) == 0
    out = capsys.readouterr().out
    assert "pooled" in out and "fold1" in out and (tmp_path / "run" / "ensemble" / "model.safetensors").exists()


@pytest.mark.shared
def test_two_fold_cv_on_real_cxr4(tmp_path, shared_data):
    overrides = [*short_real_run(shared_data / "cxr4", tmp_path / "cache"), "data.image_size=32", "train.batch_size=32"]
    config = load_config(find_config("cxr4"), overrides)
    metrics = cross_validate(config, tmp_path / "run", 2, progress=False, n_resamples=20)
    folds = pd.read_csv(tmp_path / "run" / cv.FOLDS_FILE, dtype=str)
    _check_folds(folds, len(load_source(shared_data / "cxr4")), 2)
    assert metrics["n_images"] == (folds["split"] != "test").sum()
    assert metrics["pooled"]["task"] == "multiclass" and len(metrics["pooled"]["labels"]) == 4
