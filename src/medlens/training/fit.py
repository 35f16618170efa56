"""The training loop, top to bottom: model, optimiser, epochs, checkpoints. Nothing else.

``fit(config, run_dir, data, ctx)`` trains on a run's prepared data (:mod:`medlens.training.data`) and
writes ``best/``, ``last/`` and ``history.csv`` after every epoch; :func:`medlens.jobs.train.train`, what
``medlens train`` calls, prepares the data before and calibrates, exports and plots after. The state of a
run travels as one :class:`TrainState`, which is also what ``last/`` stores for ``--resume``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from medlens.config import PHANTOMS, Config
from medlens.io import write_atomic
from medlens.models.checkpoint import load_training_state, load_weights, save_checkpoint
from medlens.models.inputs import probabilities, to_channels_last, to_input
from medlens.runs import BEST_DIR, HISTORY_FILE, LAST_DIR
from medlens.training import distributed
from medlens.training.batches import augment, batches, epoch_order, shard
from medlens.training.data import RunData
from medlens.training.losses import make_loss

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10
"""Batches between progress-bar refreshes: reading the running loss back to the host waits for the device."""


def build_model(config: Config, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The classifier a config describes, frozen as its strategy says; ``pretrained=False`` skips the weights
    (for a model whose weights are loaded next)."""
    from medlens.models import apply_strategy, create_model

    m = config.model
    model = create_model(
        m.name,
        num_classes=num_classes,
        in_chans=config.data.channels,
        pretrained=m.pretrained if pretrained else False,
        head=m.head,
        head_hidden=m.head_hidden,
        head_dropout=m.head_dropout,
        drop_rate=m.drop_rate,
    )
    apply_strategy(model, m.strategy, last_n=m.last_n)
    return to_channels_last(model)


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    from medlens.models import param_groups

    t = config.train
    groups = param_groups(model, t.lr, backbone_lr_mult=t.backbone_lr_mult, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr)
    return torch.optim.AdamW(groups, lr=t.lr)


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
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
        "kind": "classifier",
        "inputs": "face-photo" if config.train.augment == "face" else "chest-xray",
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


@dataclass
class TrainState:
    """Everything a run carries from epoch to epoch; ``last/`` holds it, so ``--resume`` continues exactly."""

    model: nn.Module
    wrapped: nn.Module
    """The model as the step calls it: ``model`` itself, or its DDP wrapper."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    epoch: int = -1
    """The last finished epoch."""
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    stale: int = 0
    """Epochs since ``best`` last improved."""

    def saved(self) -> dict[str, Any]:
        """What ``last/`` stores beside the weights."""
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "history": self.history,
            "best": self.best,
            "stale": self.stale,
        }


def fit(
    config: Config, run_dir: Path, data: RunData, ctx: distributed.Dist, resume: bool, progress: bool
) -> dict[str, Any]:
    """Train ``config.train.epochs`` epochs (or until early stopping); returns the best epoch's history row."""
    t = config.train
    state = start(config, run_dir, data, ctx, resume)
    manifest = manifest_for(config, data, state.model)
    for epoch in range(state.epoch + 1, t.epochs):
        train_loss = train_epoch(config, state, data, ctx, epoch, progress)
        scores = validate(state, data, ctx)
        improved = record_epoch(config, state, epoch, train_loss, scores)
        if ctx.is_main:
            save_epoch(run_dir, state, manifest, scores, improved)
        distributed.barrier(ctx)
        shown = " ".join(f"{k} {v:.4f}" for k, v in scores.items() if not math.isnan(v))
        log.info("epoch %d: train_loss %.4f %s%s", epoch, train_loss, shown, " (best)" if improved else "")
        if t.early_stopping and state.stale >= t.early_stopping:
            log.info("early stopping: %s has not improved for %d epochs", t.best_metric, state.stale)
            break
    sign = 1 if t.best_metric == "val_loss" else -1
    return min(state.history, key=lambda row: row[t.best_metric] * sign)


def start(config: Config, run_dir: Path, data: RunData, ctx: distributed.Dist, resume: bool) -> TrainState:
    """A fresh state (seeded model, optimiser, scheduler, loss), or the one ``last/`` holds with ``resume``."""
    t = config.train
    torch.manual_seed(t.seed)
    model = build_model(config, len(data.table.label_names)).to(ctx.device)
    optimizer = make_optimizer(config, model)
    loss_fn = make_loss(
        data.table.task, data.table.labels[data.splits["train"]], t.pos_weighting, t.class_weights, t.label_smoothing
    ).to(ctx.device)
    state = TrainState(model, _wrap(model, ctx), optimizer, make_scheduler(config, optimizer), loss_fn)
    if resume:
        _resume(run_dir, state)
    return state


def _wrap(model: nn.Module, ctx: distributed.Dist) -> nn.Module:
    if not ctx.enabled:
        return model
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _resume(run_dir: Path, state: TrainState) -> None:
    last = run_dir / LAST_DIR
    if not last.exists() and (run_dir / f"{LAST_DIR}.old").exists():
        last = run_dir / f"{LAST_DIR}.old"  # a crash between the two renames of a checkpoint write
    if not last.exists():
        log.info("nothing to resume in %s: starting from epoch 0", run_dir)
        return
    state.model.load_state_dict(load_weights(last))
    saved = load_training_state(last)
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scheduler is not None and saved.get("scheduler") is not None:
        state.scheduler.load_state_dict(saved["scheduler"])
    state.epoch, state.history = saved["epoch"], saved["history"]
    state.best, state.stale = saved["best"], saved["stale"]
    log.info("resuming %s after epoch %d", run_dir, state.epoch)


def train_epoch(
    config: Config, state: TrainState, data: RunData, ctx: distributed.Dist, epoch: int, progress: bool
) -> float:
    """One pass over the training split; returns the mean training loss across ranks."""
    t = config.train
    # Every random draw of an epoch derives from (seed, epoch, rank): resuming at an epoch boundary
    # replays exactly what an unbroken run would have done.
    torch.manual_seed(t.seed * 100_003 + epoch * 1_009 + ctx.rank)
    generator = torch.Generator().manual_seed(t.seed * 7_919 + epoch * 31 + ctx.rank)
    rows = data.splits["train"][epoch_order(len(data.splits["train"]), t.seed, epoch)]
    state.wrapped.train()
    # The loss is summed where it is computed and read back only when the bar refreshes.
    total = torch.zeros((), dtype=torch.float32, device=ctx.device)
    count = 0
    bar = tqdm(total=len(rows), desc=f"epoch {epoch + 1}/{t.epochs}", unit="img", disable=not progress, leave=False)
    for step, batch in enumerate(batches(rows, t.batch_size)):
        if len(batch) < ctx.world:
            continue  # a tail too short to give every rank a row (same decision on every rank)
        # Each rank takes an interleaved share of the global batch and weighs its mean loss by its share,
        # so DDP's gradient average equals the gradient of the global batch's mean loss.
        chunk = batch[ctx.rank :: ctx.world]
        x = _inputs(data, chunk, state.model).to(ctx.device)
        x = augment(x, t.augment, t.augment_strength, generator).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(data.table.labels[chunk]).to(ctx.device)
        loss = state.loss_fn(state.wrapped(x), y)
        state.optimizer.zero_grad(set_to_none=True)
        (loss * (len(chunk) * ctx.world / len(batch))).backward()
        state.optimizer.step()
        total += loss.detach() * len(chunk)
        count += len(chunk)
        bar.update(len(batch))
        if progress and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{float(total) / count:.4f}")
    bar.close()
    return _mean_across_ranks(ctx, total, count)


def _mean_across_ranks(ctx: distributed.Dist, total: torch.Tensor, count: int) -> float:
    sums = torch.stack([total.to(torch.float64), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
    if ctx.enabled:
        torch.distributed.all_reduce(sums)
    return float(sums[0]) / max(float(sums[1]), 1.0)


def _inputs(data: RunData, rows: np.ndarray, model: nn.Module) -> torch.Tensor:
    images = data.cache.images[data.cache_rows[rows]]
    return to_input(images, model.mean, model.std)


@torch.no_grad()
def predict_rows(
    model: nn.Module, data: RunData, rows: np.ndarray, ctx: distributed.Dist, batch_size: int = 64
) -> torch.Tensor:
    """Logits for ``rows`` of the table, computed across ranks and gathered in order (on the run's device)."""
    model.eval()
    mine = shard(rows, ctx.rank, ctx.world)
    outputs = [
        model(_inputs(data, chunk, model).to(ctx.device).contiguous(memory_format=torch.channels_last)).float()
        for chunk in batches(mine, batch_size)
    ]
    logits = torch.cat(outputs) if outputs else torch.empty(0, len(data.table.label_names), device=ctx.device)
    return distributed.gather_rows(ctx, logits, len(rows))


def validate(state: TrainState, data: RunData, ctx: distributed.Dist) -> dict[str, float]:
    """Validation loss, macro AUC and (multi-class) accuracy of the model as it is now."""
    rows = data.splits["val"]
    logits = predict_rows(state.model, data, rows, ctx)
    labels = data.table.labels[rows]
    loss = float(state.loss_fn(logits, torch.from_numpy(labels).to(logits.device)))
    probs = probabilities(logits, data.table.task).cpu().numpy()
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


def record_epoch(
    config: Config, state: TrainState, epoch: int, train_loss: float, scores: dict[str, float]
) -> bool:
    """Step the scheduler, note the epoch in the history, and say whether it is the best so far."""
    metric = config.train.best_metric
    lrs = [g["lr"] for g in state.optimizer.param_groups]  # the rate this epoch trained with
    if isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        state.scheduler.step(scores[metric])
    elif state.scheduler is not None:
        state.scheduler.step()
    improved = state.best is None or _better(scores[metric], state.best, metric)
    state.best, state.stale = (scores[metric], 0) if improved else (state.best, state.stale + 1)
    state.epoch = epoch
    state.history.append({"epoch": epoch, "train_loss": train_loss, **scores, "lr": max(lrs)})
    return improved


def _better(value: float, best: float, metric: str) -> bool:
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric == "val_loss" else value > best


def save_epoch(
    run_dir: Path, state: TrainState, manifest: dict[str, Any], scores: dict[str, float], improved: bool
) -> None:
    """``best/`` (if improved), ``last/`` with the training state, then history.csv."""
    described = {**manifest, "epoch": state.epoch, "metrics": scores}
    # best/ first: a crash between the two writes must never leave last/ ahead of a stale best/.
    if improved:
        save_checkpoint(run_dir / BEST_DIR, state.model, described)
    save_checkpoint(run_dir / LAST_DIR, state.model, described, training_state=state.saved())
    write_atomic(run_dir / HISTORY_FILE, pd.DataFrame(state.history).to_csv(index=False))
