"""Untrusted checkpoints: no loader runs code hidden in one (configs: tests/test_config.py).

The payloads are real: unpickled, each one writes a marker file (checked first), and every loader must
refuse the file before that can happen.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import tiny_run

from medlens.config import load_config
from medlens.errors import CheckpointError
from medlens.inference import load_model
from medlens.jobs.train import train
from medlens.models.checkpoint import STATE_TENSORS, WEIGHTS
from medlens.serve.app import create_app

CONFIG = tiny_run("train.epochs=1")


class _WritesAFile:
    """Unpickling this writes ``marker``: what a hostile checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran\n"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, CONFIG), run, progress=False)
    return run


@pytest.fixture
def run(trained: Path) -> Iterator[Path]:
    """The trained run, to tamper with: the files a test may replace are put back after it."""
    files = [trained / "best" / WEIGHTS, trained / "last" / STATE_TENSORS]
    kept = {path: path.read_bytes() for path in files}
    yield trained
    for path, data in kept.items():
        path.write_bytes(data)


def _pickle_payload(marker: Path) -> bytes:
    payload = pickle.dumps({"weight": _WritesAFile(marker)})
    pickle.loads(payload)  # the payload is live: it does write the file
    assert marker.exists()
    marker.unlink()
    return payload


def _torch_payload(marker: Path, path: Path) -> bytes:
    """A PyTorch checkpoint (a pickle inside a zip) renamed to look like safetensors."""
    torch.save({"weight": _WritesAFile(marker)}, path)
    torch.load(path, weights_only=False)  # live as well
    assert marker.exists()
    marker.unlink()
    return path.read_bytes()


@pytest.mark.parametrize("format", ["pickle", "torch"])
def test_a_checkpoint_with_code_in_it_is_refused_by_every_loader(run, tmp_path, format):
    marker = tmp_path / "pwned"
    payload = _pickle_payload(marker) if format == "pickle" else _torch_payload(marker, tmp_path / "evil.pt")
    (run / "best" / WEIGHTS).write_bytes(payload)
    (run / "last" / STATE_TENSORS).write_bytes(payload)

    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(run)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"), TestClient(create_app(run)):
        pass  # the server refuses to start on it
    with pytest.raises(CheckpointError, match="no usable training state"):
        train(load_config(None, [*CONFIG, "train.epochs=2"]), run, resume=True, progress=False)
    assert not marker.exists(), "loading the checkpoint ran the code inside it"
