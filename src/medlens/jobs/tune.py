"""Hyperparameter search by cross-validation with Optuna: ``medlens tune CONFIG --trials N --folds K --out DIR``.

Each trial cross-validates (:mod:`medlens.jobs.cv`) the config with sampled values of: the learning rate
(log scale), the freeze strategy (``head``, ``last_n`` with 1-4 blocks, ``full``), the augmentation strength,
the image size, loss weighting on/off (positive weights for multi-label, class weights for multi-class) and
the contrast option. The objective is the pooled out-of-fold macro AUC (one-vs-rest for multi-class): free
of thresholds, defined for both tasks, and steadier than accuracy or F1 on folds of a few dozen images.
After each fold a trial reports the mean AUC of its folds so far, and Optuna's MedianPruner stops a trial
whose running mean falls below the median of earlier trials at the same fold.

The study lives in ``DIR/optuna.db`` (SQLite) under a fixed name, so running the command again resumes:
``--trials N`` is the total of finished (complete or pruned) trials, and a trial an interruption left
running is marked failed and not counted. Run one ``tune`` per DIR at a time. ``--timeout`` stops starting
new trials after that many seconds (a trial under way finishes). DIR holds:

- ``optuna.db``; ``best.yaml``: the config with the best trial's values, ready for ``medlens train``;
- ``search.png``: the objective per trial and the best so far;
- ``trials/{number}/``: each trial's ``cv_metrics.json`` and ``cv_curves.png`` (its checkpoints are deleted);
- ``cache/{size}-{contrast}-{crop}/``: preprocessing caches shared by the trials that use them.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlens.config import PHANTOMS, Config
from medlens.data.phantoms import ensure_phantoms
from medlens.data.transforms import CONTRASTS
from medlens.errors import ConfigError
from medlens.extras import require
from medlens.io import write_atomic
from medlens.jobs.cv import CV_CURVES_FILE, CV_METRICS_FILE, cross_validate
from medlens.runs import PHANTOMS_DIR

log = logging.getLogger(__name__)

STUDY_NAME = "medlens-tune"
STORAGE_FILE = "optuna.db"
BEST_CONFIG_FILE = "best.yaml"
SEARCH_PLOT_FILE = "search.png"
OBJECTIVE = "macro_auc"
KEPT = (CV_METRICS_FILE, CV_CURVES_FILE)


@dataclass(frozen=True)
class SearchSpace:
    """The ranges a trial samples from."""

    lr: tuple[float, float] = (1e-5, 1e-2)
    strategies: tuple[str, ...] = ("head", "last_n", "full")
    last_n: tuple[int, int] = (1, 4)
    augment_strength: tuple[float, float] = (0.0, 1.5)
    image_sizes: tuple[int, ...] = (128, 224, 320)
    contrasts: tuple[str, ...] = CONTRASTS


def tune(
    config: Config,
    out: str | Path,
    trials: int,
    folds: int,
    timeout: float | None = None,
    space: SearchSpace = SearchSpace(),
    progress: bool = False,
) -> Any:
    """Run (or resume) the search in ``out`` until ``trials`` trials have finished; returns the Optuna study."""
    optuna = _optuna()
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{out / STORAGE_FILE}",
        study_name=STUDY_NAME,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=config.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        load_if_exists=True,
    )
    _fail_interrupted(study)
    searched = _fixed_source(config, out)
    remaining = trials - len(_finished(study))
    if remaining > 0:
        log.info("tuning: %d trials to run in %s (%d finished earlier)", remaining, out, trials - remaining)
        study.optimize(lambda trial: _objective(trial, searched, out, folds, space, progress), remaining, timeout)
    else:
        log.info("tuning: %d trials already finished in %s", trials - remaining, out)
    if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        raise ConfigError(f"no trial in {out} completed (all were pruned or failed): run more --trials")
    _write_best(study, config, out)
    _plot_search(study, out)
    return study


def _optuna() -> Any:
    return require("optuna", extra="tune")


def _fixed_source(config: Config, out: Path) -> Config:
    """Phantoms are generated once, into ``out``, so every trial sees (and caches) the same images."""
    if config.data.source != PHANTOMS:
        return config
    spec = config.data.phantoms
    folder = ensure_phantoms(out / PHANTOMS_DIR, n=spec.n, task=spec.task, size=spec.size, seed=spec.seed)  # type: ignore[arg-type]
    return dataclasses.replace(config, data=dataclasses.replace(config.data, source=str(folder)))


def _finished(study: Any) -> list[Any]:
    states = _optuna().trial.TrialState
    return study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))


def _fail_interrupted(study: Any) -> None:
    states = _optuna().trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        log.warning("trial %d was left running by an interrupted search: marked failed", trial.number)
        study.tell(trial.number, state=states.FAIL)


def _objective(trial: Any, config: Config, out: Path, folds: int, space: SearchSpace, progress: bool) -> float:
    params = {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "strategy": trial.suggest_categorical("strategy", list(space.strategies)),
        "augment_strength": trial.suggest_float("augment_strength", *space.augment_strength),
        "image_size": trial.suggest_categorical("image_size", list(space.image_sizes)),
        "loss_weighting": trial.suggest_categorical("loss_weighting", [True, False]),
        "contrast": trial.suggest_categorical("contrast", list(space.contrasts)),
    }
    if params["strategy"] == "last_n":
        params["last_n"] = trial.suggest_int("last_n", *space.last_n)
    trial_config = with_params(config, params, out / "cache")
    trial_dir = out / "trials" / str(trial.number)
    fold_aucs: list[float] = []

    def report(fold: int, metrics: dict[str, Any]) -> None:
        if metrics.get(OBJECTIVE) is not None:
            fold_aucs.append(metrics[OBJECTIVE])
            trial.report(float(np.mean(fold_aucs)), fold)
        if trial.should_prune():
            raise _optuna().TrialPruned(f"fold {fold}: mean {OBJECTIVE} {np.mean(fold_aucs):.3f} below the median")

    log.info("trial %d: %s", trial.number, params)
    try:
        metrics = cross_validate(trial_config, trial_dir, folds, progress=progress, n_resamples=0, on_fold=report)
    finally:
        _keep_only_results(trial_dir)
    value = metrics["pooled_headline"][OBJECTIVE]
    log.info("trial %d: pooled out-of-fold %s %s", trial.number, OBJECTIVE, value)
    return float("nan") if value is None else float(value)


def with_params(config: Config, params: dict[str, Any], cache_root: Path | None = None) -> Config:
    """``config`` with a trial's values; with ``cache_root``, a cache per preprocessing under it."""
    d, m, t = config.data, config.model, config.train
    data = dataclasses.replace(d, image_size=params["image_size"], contrast=params["contrast"])
    if cache_root is not None:
        data.cache = str(cache_root / f"{data.image_size}-{data.contrast}-{data.crop_border}")
    model = dataclasses.replace(m, strategy=params["strategy"], last_n=params.get("last_n", 0))
    weighting = params["loss_weighting"]
    train = dataclasses.replace(
        t,
        lr=params["lr"],
        augment_strength=params["augment_strength"],
        pos_weighting=weighting,
        class_weights=weighting,
    )
    return dataclasses.replace(config, data=data, model=model, train=train)


def _keep_only_results(trial_dir: Path) -> None:
    """A trial's checkpoints are not reused: keep its metrics and curves, drop the rest."""
    if not trial_dir.exists():
        return
    for path in trial_dir.iterdir():
        if path.name in KEPT:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _write_best(study: Any, config: Config, out: Path) -> None:
    best = study.best_trial
    text = with_params(config, best.params).to_yaml()
    header = (
        f"# medlens tune: trial {best.number} of {len(_finished(study))}, pooled out-of-fold "
        f"{OBJECTIVE} {best.value:.4f}\n"
    )
    write_atomic(out / BEST_CONFIG_FILE, header + text)
    log.info("best trial %d (%s %.4f): %s", best.number, OBJECTIVE, best.value, out / BEST_CONFIG_FILE)


def _plot_search(study: Any, out: Path) -> None:
    from medlens.evaluation.plots import plot_search

    trials = [t for t in _finished(study) if t.value is not None or t.intermediate_values]
    numbers = [t.number for t in trials]
    values = [t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)] for t in trials]
    pruned = [t.value is None for t in trials]
    plot_search(numbers, values, pruned, best_so_far(values, pruned), out / SEARCH_PLOT_FILE)


def best_so_far(values: Sequence[float], pruned: Sequence[bool]) -> list[float]:
    """The running maximum of the completed trials' values (NaN before the first one)."""
    best, running = float("nan"), []
    for value, stopped in zip(values, pruned, strict=True):
        if not stopped and not np.isnan(value) and (np.isnan(best) or value > best):
            best = value
        running.append(best)
    return running
