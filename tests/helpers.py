"""What several test modules share: the tiny-run overrides, the real-data short run, Chromium's flags."""

from __future__ import annotations

from pathlib import Path

TINY_RUN = (
    "model.name=tiny",
    "data.image_size=48",
    "data.phantoms.n=64",
    "data.phantoms.size=64",
    "train.batch_size=16",
    "train.optimizer=adam",
    "train.lr=1e-3",
    "train.scheduler=none",
)
"""A run on generated phantoms that trains in seconds; later overrides win over these."""


def tiny_run(*extra: str) -> list[str]:
    return [*TINY_RUN, *extra]


def short_real_run(source: Path, cache: Path) -> list[str]:
    """Overrides that turn a ready config into a 1-epoch tiny-model run on real data, offline (no hub weights)."""
    return [
        "model.name=tiny",
        "model.pretrained=false",
        "model.strategy=full",
        "model.last_n=0",
        "data.image_size=64",
        "train.epochs=1",
        f"data.source={source}",
        f"data.cache={cache}",
    ]


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Without the background-networking flags Chromium keeps dialling hosts this machine cannot reach."""

METRICS_JSON_KEYS = frozenset(
    {"task", "labels", "n_images", "n_patients", "auc", "auc_ci", "auc_summary", "ap", "accuracy",
     "balanced_accuracy", "top_k", "ece", "thresholds", "per_class", "subgroups"}
)  # fmt: skip
"""The keys the evaluation issue asks metrics.json to carry."""


def face_probe(source: Path, *extra: str) -> list[str]:
    """Overrides for a dlib-face probe on a folder of face photos (later overrides win)."""
    return [
        "model.name=dlib_face",
        "model.strategy=probe",
        f"data.source={source}",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        *extra,
    ]
