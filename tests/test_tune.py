"""Hyperparameter search: a tiny search completes, writes a config train accepts, and resumes."""

from __future__ import annotations

import optuna
from helpers import tiny_run

from medlens.cli import main
from medlens.config import load_config
from medlens.jobs.tune import BEST_CONFIG_FILE, SEARCH_PLOT_FILE, STORAGE_FILE, STUDY_NAME, best_so_far


def _tune(out, trials: int) -> int:
    sets = [a for o in tiny_run("train.epochs=1", "data.phantoms.n=40") for a in ("--set", o)]
    args = ["tune", "/dev/null", "--out", str(out), "--trials", str(trials), "--folds", "2"]
    return main([*args, "--image-sizes", "32", "48", *sets])


def test_a_tiny_search_completes_and_resumes(tmp_path):
    out = tmp_path / "tune"
    assert _tune(out, 2) == 0
    best = load_config(out / BEST_CONFIG_FILE)
    assert best.model.name == "tiny" and best.data.image_size in (32, 48) and best.data.cache is None
    assert (out / SEARCH_PLOT_FILE).stat().st_size > 0
    assert _tune(out, 3) == 0
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STORAGE_FILE}")
    assert len(study.trials) == 3  # the first two were kept, not repeated
    assert _tune(out, 3) == 0  # nothing left to run
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STORAGE_FILE}").trials) == 3


def test_best_so_far_ignores_pruned_trials():
    running = best_so_far([0.6, 0.9, 0.7, 0.8], [False, True, False, False])
    assert running == [0.6, 0.6, 0.7, 0.8]
