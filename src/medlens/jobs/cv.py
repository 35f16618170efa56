"""Patient-grouped K-fold cross-validation: a model per fold, out-of-fold predictions, the fold ensemble.

``cross_validate(config, run_dir, k)`` is what ``medlens train CONFIG --folds K`` calls. The config's
``test_fraction`` is carved out first as a fixed, patient-grouped test split that no fold sees; the K folds
cover every other image exactly once (``val_fraction`` is not used: each fold is the next one's validation
split). A run folder holds:

- ``folds.csv``: ``path, patient_id, split`` with split ``fold0`` .. ``fold{K-1}`` or ``test``;
- ``splits.csv``: ``train`` (every fold image) and ``test``: what the ensemble learned from, so
  ``medlens evaluate RUN_DIR/ensemble`` scores the held-out test split;
- ``fold{i}/``: an ordinary run folder (``best/``, ``last/``, ``history.csv``, its ``splits.csv``) plus
  ``oof.csv``, its best checkpoint's calibrated probabilities for its validation fold; ``oof.csv`` marks a
  finished fold, so ``--resume`` skips it (and continues an unfinished one from its ``last/``);
- ``ensemble/``: the fold ensemble (:mod:`medlens.models.ensemble`), thresholds chosen on the pooled
  out-of-fold predictions;
- ``cv_metrics.json``: per-fold and pooled out-of-fold metrics in ``metrics.json`` format, and the mean and
  sd across folds of the headline metrics; ``cv_curves.png``: every fold's training curves.

Each fold picks its best epoch and temperature on its own validation fold, so out-of-fold figures carry
that (small) selection optimism; the held-out test split carries none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlens.config import PHANTOMS, Config
from medlens.data.records import RecordTable
from medlens.data.splits import fold_splits, read_splits, write_splits
from medlens.errors import ConfigError, MedlensError
from medlens.evaluation.calibration import operating_points, operating_thresholds
from medlens.io import write_atomic
from medlens.jobs.train import check_config, export_trained, train
from medlens.models.checkpoint import read_manifest
from medlens.models.ensemble import save_ensemble
from medlens.runs import HISTORY_FILE, SPLITS_FILE
from medlens.training.data import RunData, load_cached_table
from medlens.training.engine import Engine

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.csv"
OOF_FILE = "oof.csv"
CV_METRICS_FILE = "cv_metrics.json"
CV_CURVES_FILE = "cv_curves.png"
ENSEMBLE_DIR = "ensemble"
HEADLINE = ("macro_auc", "mean_ap", "accuracy", "balanced_accuracy", "ece")
"""The metrics summarised as mean ± sd across folds (those a task leaves undefined are skipped)."""

FoldCallback = Callable[[int, dict[str, Any]], None]
"""Called after each fold with its index and metrics; hyperparameter search prunes from here."""


@dataclass
class Fold:
    name: str
    rows: np.ndarray
    probs: np.ndarray
    manifest: dict[str, Any]
    metrics: dict[str, Any]


def cross_validate(
    config: Config,
    run_dir: str | Path,
    k: int,
    resume: bool = False,
    progress: bool = True,
    n_resamples: int = 1000,
    on_fold: FoldCallback | None = None,
) -> dict[str, Any]:
    """Train a model per fold into ``run_dir``, pool the out-of-fold predictions, build the ensemble.

    Returns what ``cv_metrics.json`` holds. ``n_resamples`` bootstrap resamples give each AUC its CI.
    """
    if k < 2:
        raise ConfigError(f"cross-validation needs --folds of at least 2, got {k}")
    if config.model.strategy == "probe":
        raise ConfigError("--folds cross-validates networks; a probe's head is regularised by cross-validation already")
    resize = check_config(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--folds trains its folds one after another in one process: launch it without torchrun")
    run_dir = Path(run_dir)
    if not resume and (run_dir / FOLDS_FILE).exists():
        raise MedlensError(f"{run_dir} already holds a cross-validation: pass --resume to continue it, or a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    config, table = _shared_data(config, run_dir, resize)
    splits = _load_or_make_folds(config, run_dir, table, k)
    # Fold models are served only inside the ensemble: only the ensemble is exported.
    fold_config = dataclasses.replace(config, train=dataclasses.replace(config.train, export_onnx=False))
    folds = []
    for i in range(k):
        folds.append(_run_fold(fold_config, run_dir, table, splits, i, k, progress, n_resamples))
        if on_fold is not None:
            on_fold(i, folds[-1].metrics)
    metrics, ensemble_fields = _pool(config, table, folds, splits, n_resamples)
    write_atomic(run_dir / CV_METRICS_FILE, json.dumps(metrics, indent=2))
    _plot_curves(run_dir, folds)
    save_ensemble(
        run_dir / ENSEMBLE_DIR,
        [run_dir / f.name / "best" for f in folds],
        ensemble_fields.pop("thresholds"),
        {f"oof_{name}": value for name, value in metrics["pooled_headline"].items()},
        **ensemble_fields,
    )
    if config.train.export_onnx:
        export_trained(run_dir / ENSEMBLE_DIR, table, _rows_except(splits, "test"))
    log.info("cross-validation done: %s; ensemble in %s", _headline_line(metrics), run_dir / ENSEMBLE_DIR)
    return metrics


def _shared_data(config: Config, run_dir: Path, resize: str) -> tuple[Config, RecordTable]:
    """One cache (and one phantom set) for every fold: the config each fold trains with, and the table."""
    data = config.data
    config = dataclasses.replace(config, data=dataclasses.replace(data, cache=data.cache or str(run_dir / "cache")))
    table, _, _ = load_cached_table(config, run_dir, Engine(), resize)
    if data.source == PHANTOMS:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=str(table.root)))
    return config, table


def _load_or_make_folds(config: Config, run_dir: Path, table: RecordTable, k: int) -> dict[str, np.ndarray]:
    path = run_dir / FOLDS_FILE
    if path.exists():
        splits = read_splits(path, table)
        if len([name for name in splits if name != "test"]) != k:
            raise ConfigError(f"{path} holds {len(splits)} splits, not {k} folds: resume with the same --folds")
        return splits
    try:
        splits = fold_splits(table, k, config.data.test_fraction, seed=config.train.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    learned = _rows_except(splits, "test")
    write_splits(run_dir / SPLITS_FILE, table, {"train": learned, "test": splits.get("test", learned[:0])})
    write_splits(path, table, splits)  # last: its presence means the folds are laid out
    return splits


def _run_fold(
    config: Config,
    run_dir: Path,
    table: RecordTable,
    splits: Mapping[str, np.ndarray],
    i: int,
    k: int,
    progress: bool,
    n_resamples: int,
) -> Fold:
    name = f"fold{i}"
    fold_dir = run_dir / name
    if (fold_dir / OOF_FILE).exists():
        log.info("fold %d/%d: finished earlier, kept", i + 1, k)
    else:
        train_rows = _rows_except(splits, name, "test")
        log.info(
            "fold %d/%d: training on %d images, validating on %d images of %d patients",
            i + 1,
            k,
            len(train_rows),
            len(splits[name]),
            len(np.unique(table.patient_ids[splits[name]])),
        )
        fold_dir.mkdir(exist_ok=True)
        if not (fold_dir / SPLITS_FILE).exists():
            fold = {"train": train_rows, "val": splits[name], **({"test": splits["test"]} if "test" in splits else {})}
            write_splits(fold_dir / SPLITS_FILE, table, fold)
        train(
            config,
            fold_dir,
            resume=(fold_dir / "last").exists(),
            progress=progress,
            on_calibrated=lambda data, probs: _write_oof(fold_dir, data, probs),
            warn_scratch=i == 0,  # the folds differ only in which images they hold out: one warning is enough
        )
    rows, probs = _read_oof(fold_dir, table, splits[name])
    manifest = read_manifest(fold_dir / "best")
    metrics = _metrics(table, rows, probs, manifest["thresholds"], n_resamples)
    log.info("fold %d/%d: %s", i + 1, k, _headline_line({"pooled_headline": headline(metrics)}))
    return Fold(name, rows, probs, manifest, metrics)


def _rows_except(splits: Mapping[str, np.ndarray], *names: str) -> np.ndarray:
    """The rows of every split but ``names``, in split order."""
    return np.concatenate([rows for name, rows in splits.items() if name not in names])


def _write_oof(fold_dir: Path, data: RunData, probs: np.ndarray) -> None:
    """The best checkpoint's probabilities (at its temperature) for the fold's validation images."""
    rows = data.splits["val"]
    frame = pd.DataFrame(probs, columns=[f"prob_{name}" for name in data.table.label_names])
    frame.insert(0, "path", data.table.frame["path"].iloc[rows].astype(str).to_numpy())
    write_atomic(fold_dir / OOF_FILE, frame.to_csv(index=False))


def _read_oof(fold_dir: Path, table: RecordTable, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.read_csv(fold_dir / OOF_FILE, dtype={"path": str})
    where = {p: i for i, p in enumerate(table.frame["path"].astype(str))}
    rows = np.array([where.get(p, -1) for p in frame["path"]], dtype=np.int64)
    if set(rows.tolist()) != set(expected.tolist()):
        raise MedlensError(f"{fold_dir / OOF_FILE} does not match {FOLDS_FILE}: delete {fold_dir} to train it again")
    return rows, frame[[f"prob_{name}" for name in table.label_names]].to_numpy(dtype=np.float64)


def _metrics(
    table: RecordTable, rows: np.ndarray, probs: np.ndarray, thresholds: list[float], n_resamples: int
) -> dict[str, Any]:
    from medlens.evaluation.metrics import evaluate_predictions

    return evaluate_predictions(
        table.task,
        table.labels[rows],
        probs,
        table.label_names,
        table.patient_ids[rows],
        thresholds=thresholds,
        n_resamples=n_resamples,
    )


def _pool(
    config: Config, table: RecordTable, folds: list[Fold], splits: Mapping[str, np.ndarray], n_resamples: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """cv_metrics.json, and the ensemble's thresholds (and operating points) from the pooled predictions."""
    from medlens.evaluation.metrics import to_jsonable

    rows = np.concatenate([f.rows for f in folds])
    probs = np.concatenate([f.probs for f in folds])
    thresholds = operating_thresholds(table.labels[rows], probs, config.train.threshold_method)
    pooled = _metrics(table, rows, probs, thresholds, n_resamples)
    per_fold = [headline(f.metrics) for f in folds]
    summary = {}
    for name in HEADLINE:
        values = [h[name] for h in per_fold]
        defined = [v for v in values if v is not None]
        if defined:
            sd = float(np.std(defined, ddof=1)) if len(defined) > 1 else None
            summary[name] = {"mean": float(np.mean(defined)), "sd": sd, "folds": values}
    metrics = {
        "k": len(folds),
        "seed": config.train.seed,
        "n_images": len(rows),
        "n_test_images": len(splits.get("test", [])),
        "folds": [
            {
                "fold": f.name,
                "checkpoint": f"{f.name}/best",
                "epoch": f.manifest.get("epoch"),
                "temperature": f.manifest.get("temperature"),
                "metrics": f.metrics,
            }
            for f in folds
        ],
        "summary": summary,
        "pooled_headline": headline(pooled),
        "pooled": pooled,
    }
    fields: dict[str, Any] = {"thresholds": thresholds}
    if table.task == "multilabel":
        fields["operating_points"] = operating_points(pooled["per_class"])
    return to_jsonable(metrics), fields


def headline(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline numbers of a ``metrics.json``: macro AUC, mean AP, accuracies, ECE (None if undefined)."""
    aps = [v for v in (metrics.get("ap") or {}).values() if v is not None]
    found = {**metrics, "mean_ap": float(np.mean(aps)) if aps else None}
    return {name: found.get(name) for name in HEADLINE}


def _headline_line(metrics: Mapping[str, Any]) -> str:
    shown = {name: v for name, v in metrics["pooled_headline"].items() if v is not None}
    return " ".join(f"{name} {value:.3f}" for name, value in shown.items())


def format_cv(metrics: Mapping[str, Any]) -> str:
    """The CV table: a row per fold, the mean ± sd across folds, the pooled out-of-fold row."""
    names = [n for n in HEADLINE if n in metrics["summary"]]
    lines = [f"{'fold':<10} {'images':>7} " + " ".join(f"{n:>17}" for n in names)]
    for fold in metrics["folds"]:
        found = headline(fold["metrics"])
        cells = " ".join(f"{_number(found[n]):>17}" for n in names)
        lines.append(f"{fold['fold']:<10} {fold['metrics']['n_images']:>7} {cells}")
    spread = [metrics["summary"][n] for n in names]
    cells = " ".join(f"{_number(s['mean']) + ' ± ' + _number(s['sd']):>17}" for s in spread)
    lines.append(f"{'mean ± sd':<10} {'':>7} {cells}")
    pooled = metrics["pooled_headline"]
    lines.append(f"{'pooled':<10} {metrics['n_images']:>7} " + " ".join(f"{_number(pooled[n]):>17}" for n in names))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _plot_curves(run_dir: Path, folds: list[Fold]) -> None:
    from medlens.evaluation.plots import plot_fold_histories

    histories = {f.name: pd.read_csv(run_dir / f.name / HISTORY_FILE) for f in folds}
    plot_fold_histories(histories, run_dir / CV_CURVES_FILE)
