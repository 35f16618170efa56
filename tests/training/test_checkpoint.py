"""Checkpoints: self-describing, atomic, never unpickled; training state round-trips."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from medlens.errors import CheckpointError
from medlens.models import checkpoint as ckpt


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_round_trip_with_manifest_and_training_state(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = {"epoch": 3, "optimizer": optimizer.state_dict(), "history": [{"epoch": 0, "val_loss": 0.5}]}
    folder = ckpt.save_checkpoint(
        tmp_path / "last",
        model,
        {"task": "multiclass", "labels": ["a", "b", "c"], "model": {"name": "x"}},
        training_state=state,
    )
    manifest = ckpt.read_manifest(folder)
    assert manifest["labels"] == ["a", "b", "c"] and manifest["versions"]["torch"] == torch.__version__
    weights = ckpt.load_weights(folder)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    restored = ckpt.load_training_state(folder)
    fresh = torch.optim.Adam(_model(1).parameters(), lr=1e-3)
    fresh.load_state_dict(restored["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(fresh.state_dict()["state"][0][key]), torch.as_tensor(value))
    assert restored["epoch"] == 3 and restored["history"][0]["val_loss"] == 0.5
    assert ckpt.resolve_checkpoint(tmp_path) == folder  # a run folder resolves to its checkpoint


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path / "best", _model(0), {"labels": ["a"], "model": {"name": "x"}, "v": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*best \(No space left on device\)"):
        ckpt.save_checkpoint(tmp_path / "best", _model(1), {"labels": ["a"], "model": {"name": "x"}, "v": 2})
    assert ckpt.read_manifest(good)["v"] == 1
    assert torch.equal(ckpt.load_weights(good)["0.weight"], _model(0).state_dict()["0.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary folder left behind


def test_a_crash_between_renames_still_resolves(tmp_path):
    ckpt.save_checkpoint(tmp_path / "last", _model(), {"labels": ["a"], "model": {"name": "x"}})
    os.replace(tmp_path / "last", tmp_path / "last.old")  # what a kill between the two renames leaves
    assert ckpt.resolve_checkpoint(tmp_path).name == "last.old"


def test_a_pickle_payload_is_refused_without_running_it(tmp_path):
    folder = ckpt.save_checkpoint(tmp_path / "best", _model(), {"labels": ["a"], "model": {"name": "x"}})
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / ckpt.WEIGHTS).write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ckpt.load_weights(folder)
    assert not marker.exists()


def test_not_a_checkpoint_says_what_is_expected(tmp_path):
    with pytest.raises(CheckpointError, match=r"manifest\.json and model\.safetensors"):
        ckpt.resolve_checkpoint(tmp_path)
