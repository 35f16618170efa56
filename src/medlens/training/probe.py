"""Training a probe: frozen embeddings of every image (cached), then a classical head fitted on the training split.

The splits are the run's patient-grouped splits, as for networks (:mod:`medlens.training.data`); images the
embedder finds nothing in (photos without a face) are left out of every split and counted. The head's
regularisation (``C`` of an SVM or logistic regression, ``alpha`` of an MLP, ``k`` of k-NN) is chosen by
patient-grouped cross-validation on the training split, unless ``model.probe_params`` fixes it; the head is
then fitted on the whole training split without calibration of its own (``calibration_folds=0``): the train
job calibrates it on the validation split, like every checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlens.config import Config
from medlens.data.records import RecordTable
from medlens.errors import ConfigError, DataSourceError
from medlens.models.embedders import create_embedder
from medlens.models.heads import REGULARISATION, create_head
from medlens.runs import EMBEDDING_CACHE_DIR
from medlens.training.data import load_or_make_splits, load_table
from medlens.training.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class ProbeFit:
    """A fitted probe and what it was fitted on."""

    table: RecordTable
    splits: dict[str, np.ndarray]
    """The run's splits, rows without an embedding left out."""
    embedder: Any
    head: Any
    embeddings: np.ndarray
    """One row per table row; NaN where the embedder found nothing."""
    n_left_out: int
    chosen: dict[str, Any]
    """The regularisation cross-validation chose, with each candidate's balanced accuracy (empty if fixed)."""

    @property
    def labels(self) -> list[str]:
        return [str(c) for c in self.head.classes_]


def check_probe(config: Config) -> None:
    """The probe's embedder and head, checked before any image is read."""
    if config.data.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {config.data.channels}")
    create_embedder(config)
    create_head(config.model.probe, **_head_params(config))


def fit_probe(config: Config, run_dir: Path, engine: Engine, progress: bool = True) -> ProbeFit:
    """Embed the data source (phantoms generated as for networks), split it by patient, fit the head on train."""
    table = load_table(config, run_dir, engine)
    if table.task != "multiclass":
        raise DataSourceError(f"{table.root}: probe heads need one class per image; this source is {table.task}")
    torch.manual_seed(config.train.seed)  # a backbone without pretrained weights is the same one every run
    embedder = create_embedder(config)
    cache = Path(config.data.cache) if config.data.cache else run_dir / EMBEDDING_CACHE_DIR
    embeddings, _ = embedder.embed_paths(table.paths, cache, progress=progress)
    found = np.isfinite(embeddings).all(axis=1)
    if not found.all():
        log.warning("%d of %d images: %s; left out", int((~found).sum()), len(table), embedder.no_frame)
    splits = {name: rows[found[rows]] for name, rows in load_or_make_splits(config, run_dir, table, engine).items()}
    train = splits["train"]
    names = np.asarray(table.label_names)[table.labels.argmax(axis=1)]
    missing = sorted(set(names[found]) - set(names[train]))
    if missing:
        log.warning("no training image with an embedding in classes %s: the head cannot predict them", missing)
    params, x, y = _head_params(config), embeddings[train], names[train]
    chosen = choose_regularisation(config.model.probe, params, x, y, table.patient_ids[train])
    head = create_head(config.model.probe, **{**params, **chosen.get("params", {})}).fit(x, y)
    return ProbeFit(table, splits, embedder, head, embeddings, int((~found).sum()), chosen)


def choose_regularisation(
    head: str, params: dict[str, Any], x: np.ndarray, y: np.ndarray, patients: np.ndarray, folds: int = 3
) -> dict[str, Any]:
    """The value of the head's regularisation parameter with the best patient-grouped CV balanced accuracy
    (ties: the stronger regularisation, listed first); {} when ``params`` fixes it or the data are too few."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold

    name, values = REGULARISATION[head]
    counts = np.unique(y, return_counts=True)[1]
    folds = min(folds, int(counts.min()), len(np.unique(patients)))
    if name in params or folds < 2:
        return {}
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=params.get("seed", 0))
    scores = {}
    for value in values:
        found = []
        for fit_rows, held_out in splitter.split(x, y, patients):
            fitted = create_head(head, **{**params, name: value}).fit(x[fit_rows], y[fit_rows])
            found.append(balanced_accuracy_score(y[held_out], fitted.predict(x[held_out])))
        scores[value] = float(np.mean(found))
    best = max(scores, key=lambda v: (scores[v], -values.index(v)))
    log.info("%s: %s=%s chosen by %d-fold patient-grouped CV (balanced accuracy %s)", head, name, best, folds, scores)
    return {"params": {name: best}, "parameter": name, "cv_balanced_accuracy": {str(v): s for v, s in scores.items()}}


def _head_params(config: Config) -> dict[str, Any]:
    return {"seed": config.train.seed, **config.model.probe_params, "calibration_folds": 0}
