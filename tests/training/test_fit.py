"""Training end to end on tiny phantoms and real data: run folder, resume, DDP, ready configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import short_real_run, tiny_run

from medlens.cli import main
from medlens.config import load_config
from medlens.errors import MedlensError
from medlens.jobs.train import train
from medlens.models.checkpoint import load_weights, read_manifest

REPO = Path(__file__).resolve().parents[2]
TINY = tiny_run()


def _config(*extra: str, task: str = "multilabel"):
    return load_config(None, [*TINY, f"data.phantoms.task={task}", *extra])


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_run_folder_describes_itself(tmp_path, task):
    best = train(_config("train.epochs=2", task=task), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {"best", "last", "history.csv", "splits.csv", "curves.png"} <= {p.name for p in run.iterdir()}
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    assert {"train_loss", "val_loss", "val_auc", "lr"} <= set(history.columns)
    manifest = read_manifest(run / "best")
    assert manifest["task"] == task and manifest["model"]["name"] == "tiny"
    assert manifest["preprocessing"]["image_size"] == 48
    assert len(manifest["thresholds"]) == len(manifest["labels"]) and manifest["temperature"] > 0
    assert manifest["config"]["train"]["epochs"] == 2 and "torch" in manifest["versions"]
    assert best["val_loss"] == pytest.approx(history["val_loss"].min())
    splits = pd.read_csv(run / "splits.csv")
    by_patient = splits.groupby("patient_id")["split"].nunique()
    assert (by_patient == 1).all()


def test_an_existing_run_is_not_overwritten(tmp_path):
    train(_config("train.epochs=1"), tmp_path / "run", progress=False)
    before = load_weights(tmp_path / "run" / "last")
    with pytest.raises(MedlensError, match="--resume"):
        train(_config("train.epochs=1"), tmp_path / "run", progress=False)
    after = load_weights(tmp_path / "run" / "last")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_ends_with_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    train(_config("train.epochs=3", "train.scheduler=plateau"), straight, progress=False)
    broken = tmp_path / "broken"
    train(_config("train.epochs=1", "train.scheduler=plateau"), broken, progress=False)
    train(_config("train.epochs=3", "train.scheduler=plateau"), broken, resume=True, progress=False)
    a, b = load_weights(straight / "last"), load_weights(broken / "last")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an unbroken run"
    assert pd.read_csv(straight / "history.csv").equals(pd.read_csv(broken / "history.csv"))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    # No BatchNorm and no augmentation: then two shards of each batch average to exactly one batch.
    overrides = [
        *TINY,
        "train.epochs=2",
        "data.phantoms.task=multiclass",
        "model.name=test_vit",
        "train.augment=none",
    ]
    single = tmp_path / "single"
    train(load_config(None, overrides), single, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [arg for o in overrides for arg in ("--set", o)]
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "medlens",
        "train",
        str(empty),
        "--out",
        str(tmp_path / "ddp"),
        *sets,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = pd.read_csv(single / "history.csv"), pd.read_csv(tmp_path / "ddp" / "history.csv")
    assert len(one) == len(two) == 2
    # The same batches, split across ranks: equal up to float summation order.
    assert abs(one["val_loss"].iloc[-1] - two["val_loss"].iloc[-1]) < 1e-3
    assert abs(one["train_loss"].iloc[-1] - two["train_loss"].iloc[-1]) < 1e-3
    assert abs(one["val_accuracy"].iloc[-1] - two["val_accuracy"].iloc[-1]) < 0.05


@pytest.mark.parametrize(
    ("config", "dataset"),
    [
        ("cxr4", "cxr4"),
        ("nih14", "nih14"),
        ("nih14-densenet121", "nih14"),
        ("syndromes12", "faces-lfw15"),  # 15 people stand in for the 12 syndromes: RGB, MLP head
    ],
)
def test_ready_configs_run_short_on_real_data(tmp_path, shared_data, config, dataset, capsys):
    run = tmp_path / "run"
    overrides = short_real_run(shared_data / dataset, tmp_path / "cache")
    args = ["train", config, "--out", str(run)]
    assert main([*args, *[a for o in overrides for a in ("--set", o)]]) == 0
    manifest = read_manifest(run)
    assert manifest["labels"] == json.loads(json.dumps(manifest["labels"]))
    assert len(manifest["labels"]) == {"cxr4": 4, "nih14": 14, "faces-lfw15": 15}[dataset]
    printed = capsys.readouterr().out
    assert "best epoch 0: train_loss" in printed, printed  # one epoch; the number once, before the figures


def test_early_stopping_and_cosine_warm_up(tmp_path, monkeypatch):
    import medlens.training.fit as fit

    # A validation loss that never improves: with patience 1 the run stops after its second epoch.
    stuck = {"val_loss": 1.0, "val_auc": 0.5, "val_accuracy": float("nan")}
    with monkeypatch.context() as patch:
        patch.setattr(fit, "validate", lambda *args: dict(stuck))
        train(_config("train.epochs=6", "train.early_stopping=1"), tmp_path / "stop", progress=False)
    assert len(pd.read_csv(tmp_path / "stop" / "history.csv")) == 2
    cosine = ["train.epochs=4", "train.scheduler=cosine", "train.warmup_epochs=1", "train.best_metric=val_auc"]
    train(_config(*cosine), tmp_path / "cosine", progress=False)
    lrs = pd.read_csv(tmp_path / "cosine" / "history.csv")["lr"].tolist()
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > lrs[3]  # ramp up over the warm-up, then decay
