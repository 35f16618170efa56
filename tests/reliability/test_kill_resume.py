"""kill -9 a training run five times, resume it each time: it ends with an unbroken run's weights.

Each kill is a real SIGKILL of ``python -m medlens train``. Two land at a random moment (a random delay
after training starts); three are placed exactly, by a driver that runs the same CLI but stops itself
(SIGSTOP) at a chosen point, where the test kills it: before a random batch of an epoch, with a
checkpoint's temporary folder half-filled, and between the two renames that swap a checkpoint in.
After every kill, whatever checkpoint is on disk must load.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import tiny_run

from medlens.models.checkpoint import load_training_state, load_weights, read_manifest, resolve_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc"),
]

EPOCHS = 6
BATCH_SIZE = 16
OVERRIDES = tiny_run(f"train.epochs={EPOCHS}", f"train.batch_size={BATCH_SIZE}")
WAIT_SECONDS = 180

# Runs the CLI like `python -m medlens`, but stops the process at the point named by its first argument.
DRIVER = """
import os, signal, sys
from pathlib import Path
from medlens.models import checkpoint
from medlens.training import fit
from medlens.cli import main

def stop():
    os.kill(os.getpid(), signal.SIGSTOP)

point, args = sys.argv[1], sys.argv[2:]
if point.startswith("batch:"):
    # fit calls augment once per training batch: stop before the forward pass of batch N.
    calls, augment = [0], fit.augment
    def counting_augment(*a, **k):
        calls[0] += 1
        if calls[0] == int(point.split(":")[1]):
            stop()
        return augment(*a, **k)
    fit.augment = counting_augment
elif point == "filling":
    # Stop with the new checkpoint's weights written into its temporary folder, nothing else yet.
    save_file = checkpoint.save_file
    def stopping_save_file(tensors, path, *a, **k):
        save_file(tensors, path, *a, **k)
        stop()
    checkpoint.save_file = stopping_save_file
elif point == "swap":
    # Stop after the live checkpoint moved aside to NAME.old, before the new one took its name.
    class Os:
        def __getattr__(self, name):
            return getattr(os, name)
        def replace(self, src, dst):
            os.replace(src, dst)
            if str(dst).endswith(".old"):
                stop()
    checkpoint.os = Os()
sys.exit(main(args))
"""


def test_five_kills_and_resumes_end_with_the_weights_of_an_unbroken_run(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    sets = [arg for override in OVERRIDES for arg in ("--set", override)]
    log = tmp_path / "train.log"

    def train(run: Path, *, resume: bool, point: str | None = None) -> subprocess.Popen:
        cli = ["-c", DRIVER, point] if point else ["-m", "medlens"]
        command = [sys.executable, *cli, "train", str(config), "--out", str(run), *sets]
        # One thread each: the same float summation order in every process, and fair on a shared machine.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("a") as out:
            out.write(f"\n$ {point or 'random'} {run.name}\n")
            return subprocess.Popen(
                [*command, *(["--resume"] if resume else [])], cwd=tmp_path, stdout=out, stderr=out, env=env
            )

    straight = tmp_path / "straight"
    assert train(straight, resume=False).wait(timeout=WAIT_SECONDS) == 0, _tail(log)

    rng = random.Random(9)
    broken = tmp_path / "broken"
    batches_per_epoch = -(-len(pd.read_csv(straight / "splits.csv").query("split == 'train'")) // BATCH_SIZE)
    points = ["random", "filling", f"batch:{rng.randint(2, batches_per_epoch + 1)}", "swap", "random"]
    for number, point in enumerate(points, start=1):
        started = log.stat().st_size
        process = train(broken, resume=number > 1, point=None if point == "random" else point)
        if point == "random":
            # Anywhere in the next epoch or so: training, validation, a checkpoint write.
            _wait_for(process, _training_since(log, started), log)
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            _wait_for(process, _stopped(process.pid), log)
        assert process.poll() is None, f"kill {number} ({point}): the run ended first\n{_tail(log)}"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        _assert_checkpoints_load(broken, f"after kill {number} ({point})")

    assert train(broken, resume=True).wait(timeout=WAIT_SECONDS) == 0, _tail(log)
    for name in ("best", "last"):
        a, b = load_weights(straight / name), load_weights(broken / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}/ weights differ from the unbroken run's"
    assert pd.read_csv(straight / "history.csv").equals(pd.read_csv(broken / "history.csv"))
    calibrated = ("thresholds", "temperature", "epoch")
    assert {k: read_manifest(straight)[k] for k in calibrated} == {k: read_manifest(broken)[k] for k in calibrated}


def _assert_checkpoints_load(run: Path, when: str) -> None:
    """Every checkpoint on disk (or the .old a kill between renames leaves) reads completely."""
    for name in ("best", "last"):
        if not (run / name).exists() and not (run / f"{name}.old").exists():
            continue
        folder = resolve_checkpoint(run / name)
        assert read_manifest(folder)["labels"], when
        assert load_weights(folder), when
        if name == "last":
            assert load_training_state(folder)["epoch"] >= 0, when


def _training_since(log: Path, offset: int) -> Callable[[], bool]:
    """The run's progress bar shows an epoch: it is past its start-up, in its training loop."""
    return lambda: b"epoch " in log.read_bytes()[offset:]


def _stopped(pid: int) -> Callable[[], bool]:
    """The process has stopped itself: its state in /proc is T."""

    def stopped() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
        except FileNotFoundError:
            return False

    return stopped


def _wait_for(process: subprocess.Popen, condition: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run exited ({process.returncode}) before the kill point\n{_tail(log)}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the kill point was not reached in {WAIT_SECONDS} s\n{_tail(log)}")
        time.sleep(0.01)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]
