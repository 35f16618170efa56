"""``medlens train``: check the config, prepare the data, run the loop, then calibrate, export and plot.

``train(config, run_dir)`` runs in one process or under ``torchrun``. Everything that can be checked
without data (the model name, its freezing, the weights source, the run folder) is checked before any
image is read or cached. After the loop, ``best/`` is calibrated on the validation split (temperature,
thresholds, operating points: :mod:`medlens.evaluation.calibration`), exported to ONNX where that works
(``train.export_onnx``), and the history is drawn as ``curves.png``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlens.config import PHANTOMS, Config, check_split
from medlens.errors import ConfigError, MedlensError
from medlens.evaluation.calibration import calibrate
from medlens.models.checkpoint import load_weights, update_manifest
from medlens.runs import BEST_DIR, CONFIG_FILE, CURVES_FILE, HISTORY_FILE, LAST_DIR
from medlens.training import engine as engines
from medlens.training.data import RunData, prepare_data
from medlens.training.engine import Engine, resolve_device, resolve_precision
from medlens.training.fit import build_model, fit, predict_rows

log = logging.getLogger(__name__)

Calibrated = Callable[[RunData, np.ndarray], None]
"""Called with the run's data and best/'s calibrated validation probabilities once they are stored."""

PARITY_IMAGES = 32
PARAMS_PER_IMAGE_LIMIT = 1_000
"""Trainable parameters per training image above which learning from random weights earns a warning."""


def train(
    config: Config,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_calibrated: Calibrated | None = None,
    warn_scratch: bool = True,
) -> dict[str, Any]:
    """Train per ``config`` into ``run_dir``; returns the best epoch's validation metrics.

    ``warn_scratch``: say so when random weights meet too few images (:func:`warn_if_overparameterised`);
    cross-validation says it for its first fold only."""
    run_dir = Path(run_dir)
    resize = check_config(config)
    engine = engines.start_engine(config.train.device, config.train.precision)
    try:
        check_run_dir(run_dir, resume, engine)
        if config.model.strategy == "probe":
            return train_probe(config, run_dir, engine, progress)
        data = prepare_data(config, run_dir, engine, resize)
        if engine.is_main and warn_scratch:
            warn_if_overparameterised(config, len(data.table.label_names), len(data.splits["train"]))
        best = fit(config, run_dir, data, engine, resume, progress and engine.is_main)
        if engine.is_main:
            _after_training(config, run_dir, data, engine, on_calibrated)
        return best
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise MedlensError(
            f"{exc.filename or run_dir}: {exc.strerror}; the checkpoints in {run_dir} are intact: "
            "free space and continue with --resume"
        ) from exc
    finally:
        engines.shutdown(engine)


def check_config(config: Config) -> str:
    """What can be checked before any data is touched: the split fractions, the model name, head, freezing
    and the weights source.

    The model is built once (a fraction of a second without weights), which checks the name, the head and
    ``last_n`` against the architecture's blocks. A local weights file is loaded into it, which checks that
    it exists and fits. Hub weights are only checked to be reachable (about a second); where the hub is not,
    they are loaded from the hub's local cache now, or the error says how to use a local file instead.
    Returns how the weights want images resized (``squash``, or ``centre-crop`` for torchxrayvision's), which
    the preprocessing cache then does.
    """
    from medlens.models.sources import hub_reachable, is_weights_file

    if config.model.strategy == "probe":
        from medlens.training.probe import check_probe

        check_probe(config)
        return "squash"
    d = config.data
    check_split(d)  # again for a Config built in code rather than read by load_config
    resolve_precision(config.train.precision, resolve_device(config.train.device))
    pretrained = config.model.pretrained
    local = is_weights_file(pretrained) or str(pretrained).startswith("xrv:")
    from_hub = bool(pretrained) and not local
    model = build_model(config, num_classes=2, pretrained=local or (from_hub and not hub_reachable()))
    wanted = model.preprocessing.input_size[-1]
    if model.preprocessing.source != "architecture" and wanted != d.image_size:
        log.warning(
            "the weights (%s) were trained at %d px but data.image_size is %d: they see images at another scale "
            "than they learned; set data.image_size=%d", model.preprocessing.source, wanted, d.image_size, wanted
        )
    return model.preprocessing.resize


def warn_if_overparameterised(config: Config, num_classes: int, n_train: int) -> int | None:
    """One warning when a network starts from random weights with more than PARAMS_PER_IMAGE_LIMIT trainable
    parameters per training image; returns the trainable count where it warned.

    Not for generated phantoms: their findings are drawn to be learnable from scratch (the demo learns them
    with about 7,600 parameters per image); on a few hundred real films such a network mostly memorises them.
    """
    if config.model.pretrained or config.data.source == PHANTOMS:
        return None
    model = build_model(config, num_classes, pretrained=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable <= PARAMS_PER_IMAGE_LIMIT * n_train:
        return None
    log.warning(
        "%s from random weights has %s trainable parameters for %s training images (%s per image, more than "
        "%s): it will mostly memorise them. Start from pretrained weights (model.pretrained, see "
        "docs/transfer.md), fit a probe on frozen features (model.strategy: probe), or train a smaller model",
        config.model.name, f"{trainable:,}", f"{n_train:,}", f"{trainable // max(n_train, 1):,}",
        f"{PARAMS_PER_IMAGE_LIMIT:,}",
    )
    return trainable


def check_run_dir(run_dir: Path, resume: bool, engine: Engine) -> None:
    """A run folder that may be written: new (or resumed with ``--resume``), creatable and writable."""
    if not resume and (run_dir / LAST_DIR).exists():
        raise MedlensError(f"{run_dir} already holds a run: pass --resume to continue it, or choose a new --out")
    if not engine.is_main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedlensError(f"cannot create the run folder {run_dir} ({exc.strerror}); choose another --out") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise MedlensError(f"the run folder {run_dir} is not writable; choose another --out")


def _after_training(
    config: Config, run_dir: Path, data: RunData, engine: Engine, on_calibrated: Calibrated | None
) -> None:
    from medlens.io import write_atomic

    write_atomic(run_dir / CONFIG_FILE, config.to_yaml())
    probs = calibrate_best(config, run_dir, data, Engine(engine.device, engine.precision))
    if config.train.export_onnx:
        export_trained(run_dir / BEST_DIR, data.table, data.splits["val"])
    _plot_history(run_dir)
    if on_calibrated is not None:
        on_calibrated(data, probs)


def train_probe(config: Config, run_dir: Path, engine: Engine, progress: bool) -> dict[str, Any]:
    """Fit a probe, calibrate it on the validation split, write it as ``best/``; returns its validation scores."""
    from medlens.io import write_atomic
    from medlens.models.heads import save_head
    from medlens.training.fit import validation_scores
    from medlens.training.probe import fit_probe

    if engine.enabled:
        raise ConfigError("a probe fits in one process: launch strategy 'probe' without torchrun")
    found = fit_probe(config, run_dir, engine, progress)
    labels = found.labels
    val = found.splits["val"]
    if len(val) == 0:
        raise ConfigError(f"no validation image has an embedding ({found.embedder.no_frame}): raise data.val_fraction")
    truth = found.table.subset(val).relabel(labels).labels
    logits = found.head.decision_function(found.embeddings[val])
    calibration = calibrate(logits, truth, "multiclass", labels, config.train.threshold_method)
    scores = validation_scores("multiclass", truth, calibration.probs)
    source = found.table.root if config.data.source == PHANTOMS else Path(config.data.source).resolve()
    state = getattr(found.embedder, "state", None)
    save_head(
        found.head,
        run_dir / BEST_DIR,
        {
            "kind": "probe",
            "task": "multiclass",
            "inputs": found.embedder.inputs,
            "embedder": found.embedder.spec(),
            "data": {"source": str(source), "kind": found.table.kind, "n_left_out": found.n_left_out},
            "config": config.to_dict(),
            "metrics": scores,
            "regularisation": found.chosen,
            **calibration.manifest_fields(),
        },
        embedder=state() if state is not None else None,
    )
    write_atomic(run_dir / CONFIG_FILE, config.to_yaml())
    log.info("%s probe: validation %s; checkpoint %s", config.model.probe, scores, run_dir / BEST_DIR)
    return scores


def calibrate_best(config: Config, run_dir: Path, data: RunData, engine: Engine) -> np.ndarray:
    """Calibrate ``best/`` on the validation split, store it there; returns its calibrated validation probabilities.

    ``engine`` is this process alone (calibration runs on rank 0 only), on the run's device."""
    model = build_model(config, len(data.table.label_names), pretrained=False)
    model.load_state_dict(load_weights(run_dir / BEST_DIR))
    rows = data.splits["val"]
    logits = predict_rows(model.to(engine.device), data, rows, engine).cpu().numpy()
    found = calibrate(
        logits, data.table.labels[rows], data.table.task, data.table.label_names, config.train.threshold_method
    )
    update_manifest(run_dir / BEST_DIR, **found.manifest_fields())
    return found.probs


def export_trained(folder: Path, table: Any, rows: np.ndarray) -> None:
    """``folder`` exported to ONNX and raced against torch, parity checked on up to 32 images of ``rows``."""
    from medlens.jobs.export import export_or_warn

    export_or_warn(folder, [table.root / path for path in table.frame["path"].iloc[rows[:PARITY_IMAGES]]])


def _plot_history(run_dir: Path) -> None:
    from medlens.evaluation.plots import plot_history

    plot_history(pd.read_csv(run_dir / HISTORY_FILE), run_dir / CURVES_FILE)
