"""The run-folder layout every layer names: a run folder holds these, and only this module spells them.

A training run folder (``medlens train CONFIG --out RUN``) holds ``best/`` (the checkpoint with the best
validation metric, calibrated), ``last/`` (the latest epoch, with the training state ``--resume`` reads),
``splits.csv`` (each image's split), ``history.csv`` (one row per epoch), ``curves.png``, ``config.yaml``,
and, when the config asks for generated data, ``phantoms/``; the preprocessing cache is ``cache/`` unless
``data.cache`` names another folder, and probes keep their embeddings in ``embedding-cache/``.
"""

from __future__ import annotations

from pathlib import Path

BEST_DIR = "best"
LAST_DIR = "last"
SPLITS_FILE = "splits.csv"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"
PHANTOMS_DIR = "phantoms"
CACHE_DIR = "cache"
EMBEDDING_CACHE_DIR = "embedding-cache"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"


def run_folder_of(checkpoint: Path | None) -> Path | None:
    """The run folder a checkpoint folder (``RUN/best``, ``RUN/last``, ``RUN/ensemble``) belongs to."""
    return None if checkpoint is None else checkpoint.parent
