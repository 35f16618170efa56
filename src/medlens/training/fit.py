"""The training run, top to bottom: data, model, optimiser, epochs, checkpoints, calibration.

``train(config, run_dir)`` is what ``medlens train`` calls, in one process or under ``torchrun``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from medlens.config import PHANTOMS, Config
from medlens.data.cache import ImageCache, build_cache
from medlens.data.records import RecordTable, load_source
from medlens.data.splits import check_no_leakage, patient_split, read_splits, undersample, write_splits
from medlens.errors import ConfigError, MedlensError
from medlens.io import write_atomic
from medlens.runtime import apply_cpu_defaults, to_channels_last
from medlens.training import distributed
from medlens.training.batches import augment, batches, epoch_order, shard, to_input
from medlens.training.checkpoint import load_training_state, load_weights, save_checkpoint, update_manifest
from medlens.training.losses import make_loss, probabilities

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.csv"
HISTORY_FILE = "history.csv"


@dataclass
class RunData:
    table: RecordTable
    splits: dict[str, np.ndarray]
    cache: ImageCache
    cache_rows: np.ndarray


Calibrated = Callable[["RunData", np.ndarray], None]
"""Called with the run's data and best/'s calibrated validation probabilities once they are stored."""

OPERATING_POINT_KEYS = ("sensitivity", "specificity", "n_positive", "n_known")


def train(
    config: Config,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_calibrated: Calibrated | None = None,
) -> dict[str, Any]:
    """Train per ``config`` into ``run_dir``; returns the best epoch's validation metrics."""
    apply_cpu_defaults()
    run_dir = Path(run_dir)
    ctx = distributed.init_distributed()
    try:
        _check_run_dir(run_dir, resume, ctx)
        data = prepare_data(config, run_dir, ctx)
        return _fit(config, run_dir, data, ctx, resume, progress and ctx.is_main, on_calibrated)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise MedlensError(
            f"{exc.filename or run_dir}: {exc.strerror}; the checkpoints in {run_dir} are intact: "
            "free space and continue with --resume"
        ) from exc
    finally:
        distributed.shutdown(ctx)


def _check_run_dir(run_dir: Path, resume: bool, ctx: distributed.Dist) -> None:
    if not resume and (run_dir / "last").exists():
        raise MedlensError(f"{run_dir} already holds a run: pass --resume to continue it, or choose a new --out")
    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"cannot create the run folder {run_dir} ({exc.strerror})"
            raise MedlensError(f"{problem}; choose another --out") from None
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise MedlensError(f"the run folder {run_dir} is not writable; choose another --out")


def prepare_data(config: Config, run_dir: Path, ctx: distributed.Dist) -> RunData:
    """The table, its patient-grouped splits (kept in splits.csv) and the preprocessing cache."""
    table, cache, cache_rows = load_cached_table(config, run_dir, ctx)
    splits = _load_or_make_splits(config, run_dir, table, ctx)
    return RunData(table, splits, cache, cache_rows)


def load_cached_table(
    config: Config, run_dir: Path, ctx: distributed.Dist
) -> tuple[RecordTable, ImageCache, np.ndarray]:
    """The table of readable images, the preprocessing cache holding them, and each image's cache row."""
    table = _load_table(config, run_dir, ctx)
    d = config.data
    cache_dir = Path(d.cache) if d.cache else run_dir / "cache"
    if ctx.is_main:
        build_cache(
            table.paths, cache_dir, d.image_size, d.channels, contrast=d.contrast, crop_border=d.crop_border
        )
    distributed.barrier(ctx)
    cache = ImageCache(cache_dir)
    cache_rows = cache.indices_of([str(p) for p in table.paths])
    readable = cache.status[cache_rows] == "ok"
    if not readable.all():
        log.warning("%d unreadable images left out of training", int((~readable).sum()))
        table, cache_rows = table.subset(np.flatnonzero(readable)), cache_rows[readable]
    return table, cache, cache_rows


def _load_table(config: Config, run_dir: Path, ctx: distributed.Dist) -> RecordTable:
    if config.data.source == PHANTOMS:
        return load_source(phantom_folder(config, run_dir, ctx))
    table = load_source(config.data.source, config.data.format)  # type: ignore[arg-type]
    if config.data.views:
        if "view" not in table.frame.columns:
            raise ConfigError(f"data.views={config.data.views} but {config.data.source} has no view column")
        table = table.subset(np.flatnonzero(table.frame["view"].isin(config.data.views).to_numpy()))
    return table


def phantom_folder(config: Config, run_dir: Path, ctx: distributed.Dist) -> Path:
    """``run_dir/phantoms``, generated there as ``data.phantoms`` says unless it already is."""
    from medlens.data.phantoms import generate_phantoms

    folder = run_dir / "phantoms"
    spec = config.data.phantoms
    if ctx.is_main and not (folder / "BBox_List_2017.csv").exists():
        generate_phantoms(folder, n=spec.n, task=spec.task, size=spec.size, seed=spec.seed, progress=False)
    distributed.barrier(ctx)
    return folder


def _load_or_make_splits(config: Config, run_dir: Path, table: RecordTable, ctx: distributed.Dist) -> dict:
    path = run_dir / SPLITS_FILE
    if path.exists():
        splits = read_splits(path, table)
    else:
        val, test = config.data.val_fraction, config.data.test_fraction
        fractions = {"train": 1.0 - val - test, "val": val, "test": test}
        splits = patient_split(table, fractions, seed=config.train.seed)
        if ctx.is_main:
            write_splits(path, table, splits)
    check_no_leakage(table, splits)
    if config.data.undersample:
        kept = undersample(
            table, splits["train"], config.data.undersample, config.data.undersample_keep, config.train.seed
        )
        log.info(
            "undersampled %r: %d -> %d training images",
            config.data.undersample,
            len(splits["train"]),
            len(kept),
        )
        splits["train"] = kept
    if len(splits.get("train", [])) == 0 or len(splits.get("val", [])) == 0:
        raise ConfigError(f"the split left no training or no validation images ({len(table)} images in all)")
    return splits


def build_model(config: Config, num_classes: int) -> nn.Module:
    from medlens.models import apply_strategy, create_model

    m = config.model
    model = create_model(
        m.name,
        num_classes=num_classes,
        in_chans=config.data.channels,
        pretrained=m.pretrained,
        head=m.head,
        head_hidden=m.head_hidden,
        head_dropout=m.head_dropout,
        drop_rate=m.drop_rate,
    )
    apply_strategy(model, m.strategy, last_n=m.last_n)
    return to_channels_last(model)


def _make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    from medlens.models import param_groups

    t = config.train
    groups = param_groups(model, t.lr, backbone_lr_mult=t.backbone_lr_mult, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr)
    return torch.optim.AdamW(groups, lr=t.lr)


def _make_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    t = config.train
    if t.scheduler == "plateau":
        mode = "min" if t.best_metric == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=t.plateau_factor, patience=t.plateau_patience
        )
    if t.scheduler == "cosine":
        warmup, total = t.warmup_epochs, max(t.epochs, 1)

        def factor(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(total - warmup, 1)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def manifest_for(config: Config, data: RunData, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must say so evaluate/explain/serve need nothing else."""
    source = config.data.source
    return {
        "task": data.table.task,
        "labels": data.table.label_names,
        "model": {
            "name": config.model.name,
            "num_classes": len(data.table.label_names),
            "in_chans": config.data.channels,
            "head": config.model.head,
            "head_hidden": list(config.model.head_hidden),
            "head_dropout": config.model.head_dropout,
        },
        "preprocessing": {
            "image_size": config.data.image_size,
            "channels": config.data.channels,
            "mean": list(model.mean),
            "std": list(model.std),
            "resize": "squash",
            "contrast": config.data.contrast,
            "crop_border": config.data.crop_border,
        },
        "data": {
            "source": str(data.table.root if source == PHANTOMS else Path(source).resolve()),
            "kind": data.table.kind,
        },
        "config": config.to_dict(),
        "thresholds": [0.5] * len(data.table.label_names),
        "temperature": 1.0,
    }


def _fit(
    config: Config,
    run_dir: Path,
    data: RunData,
    ctx: distributed.Dist,
    resume: bool,
    progress: bool,
    on_calibrated: Calibrated | None,
) -> dict[str, Any]:
    t = config.train
    torch.manual_seed(t.seed)
    model = build_model(config, len(data.table.label_names)).to(ctx.device)
    optimizer = _make_optimizer(config, model)
    scheduler = _make_scheduler(config, optimizer)
    loss_fn = make_loss(
        data.table.task,
        data.table.labels[data.splits["train"]],
        t.pos_weighting,
        t.class_weights,
        t.label_smoothing,
    ).to(ctx.device)
    state = _resume_state(run_dir, model, optimizer, scheduler) if resume else None
    history: list[dict[str, Any]] = state["history"] if state else []
    best = state["best"] if state else None
    stale = state["stale"] if state else 0
    wrapped = _wrap(model, ctx)
    manifest = manifest_for(config, data, model)
    for epoch in range(state["epoch"] + 1 if state else 0, t.epochs):
        train_loss = _train_epoch(config, wrapped, model, optimizer, loss_fn, data, ctx, epoch, progress)
        scores = _validate(config, model, loss_fn, data, ctx)
        lrs = [g["lr"] for g in optimizer.param_groups]  # the rate this epoch trained with
        _step_scheduler(scheduler, scores[t.best_metric])
        improved = best is None or _better(scores[t.best_metric], best, t.best_metric)
        best, stale = (scores[t.best_metric], 0) if improved else (best, stale + 1)
        history.append({"epoch": epoch, "train_loss": train_loss, **scores, "lr": max(lrs)})
        if ctx.is_main:
            _save_epoch(run_dir, model, manifest, optimizer, scheduler, history, best, stale, epoch, improved, scores)
        distributed.barrier(ctx)
        log.info(
            "epoch %d: train_loss %.4f %s%s",
            epoch,
            train_loss,
            " ".join(f"{k} {v:.4f}" for k, v in scores.items() if not math.isnan(v)),
            " (best)" if improved else "",
        )
        if t.early_stopping and stale >= t.early_stopping:
            log.info("early stopping: %s has not improved for %d epochs", t.best_metric, stale)
            break
    if ctx.is_main:
        validation_probs = _calibrate_best(config, run_dir, data)
        if t.export_onnx:
            export_trained(run_dir / "best", data.table, data.splits["val"])
        _plot_history(run_dir)
        if on_calibrated is not None:
            on_calibrated(data, validation_probs)
    best_row = min(history, key=lambda r: r[t.best_metric] * (1 if t.best_metric == "val_loss" else -1))
    return best_row


def _wrap(model: nn.Module, ctx: distributed.Dist) -> nn.Module:
    if not ctx.enabled:
        return model
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _train_epoch(
    config: Config,
    wrapped: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: RunData,
    ctx: distributed.Dist,
    epoch: int,
    progress: bool,
) -> float:
    t = config.train
    # Every random draw of an epoch derives from (seed, epoch, rank): resuming at an epoch boundary
    # replays exactly what an unbroken run would have done.
    torch.manual_seed(t.seed * 100_003 + epoch * 1_009 + ctx.rank)
    generator = torch.Generator().manual_seed(t.seed * 7_919 + epoch * 31 + ctx.rank)
    rows = data.splits["train"][epoch_order(len(data.splits["train"]), t.seed, epoch)]
    wrapped.train()
    total, count = 0.0, 0
    bar = tqdm(total=len(rows), desc=f"epoch {epoch + 1}/{t.epochs}", unit="img", disable=not progress, leave=False)
    for batch in batches(rows, t.batch_size):
        if len(batch) < ctx.world:
            continue  # a tail too short to give every rank a row (same decision on every rank)
        # Each rank takes an interleaved share of the global batch and weighs its mean loss by its share,
        # so DDP's gradient average equals the gradient of the global batch's mean loss.
        chunk = batch[ctx.rank :: ctx.world]
        x = _inputs(data, chunk, model).to(ctx.device)
        x = augment(x, t.augment, t.augment_strength, generator).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(data.table.labels[chunk]).to(ctx.device)
        loss = loss_fn(wrapped(x), y)
        optimizer.zero_grad(set_to_none=True)
        (loss * (len(chunk) * ctx.world / len(batch))).backward()
        optimizer.step()
        total += loss.item() * len(chunk)
        count += len(chunk)
        bar.update(len(batch))
        bar.set_postfix(loss=f"{total / count:.4f}")
    bar.close()
    return _mean_across_ranks(ctx, total, count)


def _mean_across_ranks(ctx: distributed.Dist, total: float, count: int) -> float:
    if ctx.enabled:
        sums = torch.tensor([total, float(count)], dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1)


def _inputs(data: RunData, rows: np.ndarray, model: nn.Module) -> torch.Tensor:
    images = data.cache.images[data.cache_rows[rows]]
    return to_input(images, model.mean, model.std)


@torch.no_grad()
def predict_rows(model: nn.Module, data: RunData, rows: np.ndarray, ctx: distributed.Dist, batch_size: int = 64):
    """Logits for ``rows`` of the table, computed across ranks and gathered in order."""
    model.eval()
    mine = shard(rows, ctx.rank, ctx.world)
    outputs = [
        model(_inputs(data, chunk, model).to(ctx.device).contiguous(memory_format=torch.channels_last)).float()
        for chunk in batches(mine, batch_size)
    ]
    logits = torch.cat(outputs) if outputs else torch.empty(0, len(data.table.label_names))
    return distributed.gather_rows(ctx, logits.cpu(), len(rows))


def _validate(
    config: Config, model: nn.Module, loss_fn: nn.Module, data: RunData, ctx: distributed.Dist
) -> dict[str, float]:
    rows = data.splits["val"]
    logits = predict_rows(model, data, rows, ctx)
    labels = data.table.labels[rows]
    loss = float(loss_fn(logits, torch.from_numpy(labels)))
    probs = probabilities(logits, data.table.task).numpy()
    return {"val_loss": loss, **validation_scores(data.table.task, labels, probs)}


def validation_scores(task: str, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Macro AUC over the labels where it is defined, and accuracy (multi-class) or NaN."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in range(labels.shape[1]):
        known = ~np.isnan(labels[:, j])
        y = labels[known, j]
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, probs[known, j]))
    auc = float(np.mean(aucs)) if aucs else float("nan")
    if task == "multiclass":
        accuracy = float((probs.argmax(1) == np.nan_to_num(labels).argmax(1)).mean())
    else:
        accuracy = float("nan")
    return {"val_auc": auc, "val_accuracy": accuracy}


def _better(value: float, best: float, metric: str) -> bool:
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric == "val_loss" else value > best


def _step_scheduler(scheduler: Any, metric: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(metric)
    elif scheduler is not None:
        scheduler.step()


def _save_epoch(
    run_dir: Path,
    model: nn.Module,
    manifest: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, Any]],
    best: float,
    stale: int,
    epoch: int,
    improved: bool,
    scores: dict[str, float],
) -> None:
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": history,
        "best": best,
        "stale": stale,
    }
    described = {**manifest, "epoch": epoch, "metrics": scores}
    # best/ first: a crash between the two writes must never leave last/ ahead of a stale best/.
    if improved:
        save_checkpoint(run_dir / "best", model, described)
    save_checkpoint(run_dir / "last", model, described, training_state=state)
    _write_history(run_dir / HISTORY_FILE, history)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    write_atomic(path, pd.DataFrame(history).to_csv(index=False))


def _resume_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict | None:
    last = run_dir / "last"
    if not last.exists() and (run_dir / "last.old").exists():
        last = run_dir / "last.old"
    if not last.exists():
        log.info("nothing to resume in %s: starting from epoch 0", run_dir)
        return None
    model.load_state_dict(load_weights(last))
    state = load_training_state(last)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    return state


def _calibrate_best(config: Config, run_dir: Path, data: RunData) -> np.ndarray:
    """Temperature and operating thresholds fitted on the validation split, stored in best/; returns best/'s
    validation probabilities at that temperature.

    Multi-label runs also store each label's validation sensitivity and specificity at its threshold
    (``operating_points``), which per-study reports quote beside every finding.
    """
    from medlens.evaluation.metrics import fit_temperature, multilabel_metrics

    model = build_model(config, len(data.table.label_names))
    model.load_state_dict(load_weights(run_dir / "best"))
    rows = data.splits["val"]
    logits = predict_rows(model, data, rows, distributed.Dist()).numpy()
    labels = data.table.labels[rows]
    task = data.table.task
    temperature = float(fit_temperature(logits, labels, task))
    probs = probabilities(torch.from_numpy(logits), task, temperature).numpy()
    thresholds = operating_thresholds(labels, probs, config.train.threshold_method)
    fields: dict[str, Any] = {"temperature": temperature, "thresholds": thresholds}
    if task == "multilabel":
        per_class = multilabel_metrics(labels, probs, data.table.label_names, thresholds)["per_class"]
        fields["operating_points"] = operating_points(per_class)
    update_manifest(run_dir / "best", **fields)
    return probs


def operating_thresholds(labels: np.ndarray, probs: np.ndarray, method: str) -> list[float]:
    """One threshold per output chosen on ``labels`` and ``probs`` by ``method``; 0.5 where none can be."""
    from medlens.evaluation.metrics import choose_thresholds

    return [0.5 if t is None else float(t) for t in choose_thresholds(labels, probs, method=method)]


def operating_points(per_class: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each label's sensitivity, specificity and counts at its threshold, as best/'s manifest stores them."""
    return {name: {key: point[key] for key in OPERATING_POINT_KEYS} for name, point in per_class.items()}


PARITY_IMAGES = 32


def export_trained(folder: Path, table: RecordTable, rows: np.ndarray) -> None:
    """``folder`` exported to ONNX and raced against torch, parity checked on up to 32 images of ``rows``."""
    from medlens.export import export_or_warn

    export_or_warn(folder, [table.root / path for path in table.frame["path"].iloc[rows[:PARITY_IMAGES]]])


def _plot_history(run_dir: Path) -> None:
    from medlens.evaluation.plots import plot_history

    plot_history(pd.read_csv(run_dir / HISTORY_FILE), run_dir / "curves.png")
