"""A full disk or an unwritable output folder: a clear error, the previous checkpoint intact, nothing lost.

The disk "fills up" at a chosen epoch: from then on the writer under test raises what a full disk makes
it raise (``OSError(ENOSPC)`` from Python writes, ``SafetensorError`` naming os error 28 from safetensors).
"""

from __future__ import annotations

import errno
import inspect
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_run
from safetensors import SafetensorError

from medlens.cli import main
from medlens.config import Config, load_config
from medlens.data.phantoms import generate_phantoms
from medlens.errors import MedlensError
from medlens.jobs.train import train
from medlens.models import checkpoint
from medlens.models.checkpoint import load_training_state, load_weights, read_manifest, resolve_checkpoint
from medlens.training import fit

EPOCHS = 2
FULL_FROM_EPOCH = 1


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A tiny run over phantoms and a preprocessing cache made once, shared by every run here."""
    shared = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(shared / "images", n=48, task="multilabel", size=64, seed=0, progress=False)
    overrides = [f"data.source={shared / 'images'}", f"data.cache={shared / 'cache'}", f"train.epochs={EPOCHS}"]
    return load_config(None, tiny_run(*overrides))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory, config: Config) -> Path:
    run = tmp_path_factory.mktemp("unbroken") / "run"
    train(config, run, progress=False)
    return run


def _enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _full_safetensors(tensors, filename, *args, **kwargs):
    raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at {filename}")


def _full_write_atomic(path, data, durable=False):
    raise _enospc(path)


# Where the full disk is felt (module, writer, what it raises then): checkpoint weights, checkpoint JSON, history.csv.
WRITERS = {
    "checkpoint-weights": (checkpoint, "save_file", _full_safetensors),
    "checkpoint-manifest": (checkpoint, "write_atomic", _full_write_atomic),
    "history": (fit, "write_atomic", _full_write_atomic),
}


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_stops_training_clearly_and_resume_loses_nothing(tmp_path, monkeypatch, config, unbroken, writer):
    module, name, full = WRITERS[writer]
    working = getattr(module, name)
    disk = {"full": False}

    def write(*args, **kwargs):
        return (full if disk["full"] else working)(*args, **kwargs)

    save_epoch = fit.save_epoch

    def save_epoch_filling_the_disk(*args, **kwargs):
        disk["full"] = inspect.signature(save_epoch).bind(*args, **kwargs).arguments["state"].epoch >= FULL_FROM_EPOCH
        save_epoch(*args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(module, name, write)
        patch.setattr(fit, "save_epoch", save_epoch_filling_the_disk)
        with pytest.raises(MedlensError, match="No space left on device") as caught:
            train(config, run, progress=False)
    assert str(run) in str(caught.value)

    # The epoch's checkpoints come before its history line: a full disk there leaves them complete.
    saved = FULL_FROM_EPOCH if writer == "history" else FULL_FROM_EPOCH - 1
    last = resolve_checkpoint(run / "last")
    assert read_manifest(last)["epoch"] == load_training_state(last)["epoch"] == saved
    assert load_weights(resolve_checkpoint(run / "best"))
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name], "a failed write left its temporary folder"

    train(config, run, resume=True, progress=False)  # space freed
    a, b = load_weights(unbroken / "last"), load_weights(run / "last")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ from an unbroken run's"


def test_a_run_folder_that_cannot_be_created_is_named(tmp_path, capsys):
    config = load_config(None, tiny_run())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    run = blocker / "run"
    with pytest.raises(MedlensError, match=rf"cannot create the run folder {re.escape(str(run))} \(Not a directory\)"):
        train(config, run, progress=False)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert main(["train", str(empty), "--out", str(run)]) == 1
    assert f"medlens: error: cannot create the run folder {run}" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode; the case above covers root")
def test_a_read_only_run_folder_is_named(tmp_path):
    config = load_config(None, tiny_run())
    run = tmp_path / "run"
    run.mkdir(mode=0o500)
    try:
        with pytest.raises(MedlensError, match=rf"the run folder {re.escape(str(run))} is not writable"):
            train(config, run, progress=False)
    finally:
        run.chmod(0o700)


def test_a_checkpoint_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(
        MedlensError, match=rf"cannot write the checkpoint {re.escape(str(blocker / 'best'))} \(File exists\)"
    ):
        checkpoint.save_checkpoint(blocker / "best", model, {"labels": ["a"], "model": {"name": "x"}})
