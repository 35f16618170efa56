"""Learning from random weights: the warning when a network has far more parameters than training images, and
a run that keeps no test split (``data.test_fraction: 0``) end to end."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
from helpers import tiny_run

from medlens.cli import main
from medlens.config import load_config
from medlens.data.phantoms import generate_phantoms
from medlens.jobs.train import PARAMS_PER_IMAGE_LIMIT, warn_if_overparameterised

REAL = "data.source=/data/films"  # any source but generated phantoms


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "trainable parameters" in r.getMessage()]


def test_random_weights_with_many_parameters_per_image_warn_once_with_both_numbers(caplog):
    config = load_config(None, ["model.name=tiny", REAL])
    with caplog.at_level(logging.WARNING, logger="medlens.jobs.train"):
        trainable = warn_if_overparameterised(config, num_classes=4, n_train=100)
    assert trainable is not None and trainable > PARAMS_PER_IMAGE_LIMIT * 100
    (message,) = _warnings(caplog)
    assert f"{trainable:,} trainable parameters for 100 training images" in message
    for alternative in ("model.pretrained", "model.strategy: probe", "smaller model"):
        assert alternative in message


@pytest.mark.parametrize(
    ("overrides", "n_train"),
    [
        (["model.pretrained=/weights/tiny.safetensors"], 100),  # pretrained: never (and the file is not read)
        ([], 100_000),  # fewer than PARAMS_PER_IMAGE_LIMIT per image
        (["data.source=phantoms"], 100),  # generated phantoms are drawn to be learnable from scratch (the demo)
    ],
    ids=["pretrained", "few parameters per image", "phantoms"],
)
def test_no_warning_with_pretrained_weights_few_parameters_or_phantoms(caplog, overrides, n_train):
    config = load_config(None, ["model.name=tiny", REAL, *overrides])
    with caplog.at_level(logging.WARNING, logger="medlens.jobs.train"):
        assert warn_if_overparameterised(config, num_classes=4, n_train=n_train) is None
    assert not _warnings(caplog)


def test_no_test_split_trains_on_the_rest_and_evaluate_says_what_to_do(tmp_path, caplog, capsys):
    images = generate_phantoms(tmp_path / "films", n=40, task="multiclass", size=64, progress=False)
    other = generate_phantoms(tmp_path / "other", n=12, task="multiclass", size=64, seed=5, progress=False)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    run = tmp_path / "run"
    sets = tiny_run("train.epochs=1", "train.export_onnx=false", f"data.source={images}", "data.test_fraction=0")
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(config), "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    assert len(_warnings(caplog)) == 1, "one warning, not one per epoch"
    splits = pd.read_csv(run / "splits.csv")
    assert set(splits["split"]) == {"train", "val"} and len(splits) == 40
    capsys.readouterr()

    assert main(["evaluate", str(run), "--out", str(tmp_path / "e0")]) == 1
    error = capsys.readouterr().err
    assert "no test split" in error and "--data" in error and "--split val" in error

    assert main(["evaluate", str(run), "--out", str(tmp_path / "val"), "--split", "val", "--resamples", "20"]) == 0
    on_val = json.loads((tmp_path / "val" / "metrics.json").read_text())["evaluated_on"]
    assert on_val["split"] == "val" and "optimistic" in on_val["note"]

    assert main(["evaluate", str(run), "--data", str(other), "--out", str(tmp_path / "e"), "--resamples", "20"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_images"] == 12 and metrics["evaluated_on"]["split"] is None


def test_cross_validation_warns_once_not_once_per_fold(tmp_path, caplog):
    images = generate_phantoms(tmp_path / "films", n=24, task="multiclass", size=64, progress=False)
    sets = tiny_run("train.epochs=1", "train.export_onnx=false", f"data.source={images}", "data.test_fraction=0")
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    argv = ["train", str(config), "--folds", "2", "--out", str(tmp_path / "cv")]
    argv += [a for s in sets for a in ("--set", s)]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert len(_warnings(caplog)) == 1
