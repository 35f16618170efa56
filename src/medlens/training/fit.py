"""The training loop, top to bottom: model, optimiser, epochs, checkpoints. Nothing else.

``fit(config, run_dir, data, engine)`` trains on a run's prepared data (:mod:`medlens.training.data`) and
writes ``best/``, ``last/`` and ``history.csv`` after every epoch; :func:`medlens.jobs.train.train`, what
``medlens train`` calls, prepares the data before and calibrates, exports and plots after. The state of a
run travels as one :class:`TrainState`, which is also what ``last/`` stores for ``--resume``.
"""

from __future__ import annotations

import logging
import math
import time
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
from medlens.training.batches import DeviceBatches, augment, batches, device_generator, epoch_order, shard
from medlens.training.data import RunData
from medlens.training.engine import Engine, fitting_batch_size, out_of_memory
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
        mean=m.mean,
        std=m.std,
        input_size=m.input_size,
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


def manifest_for(config: Config, data: RunData, model: nn.Module, engine: Engine) -> dict[str, Any]:
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
            "resize": model.preprocessing.resize,
            "input_scaling": model.preprocessing.input_scaling,
            "said_by": model.preprocessing.source,
            "contrast": config.data.contrast,
            "crop_border": config.data.crop_border,
        },
        "weights": model.weights_info,
        "data": {
            "source": str(data.table.root if source == PHANTOMS else Path(source).resolve()),
            "kind": data.table.kind,
        },
        "config": config.to_dict(),
        "thresholds": [0.5] * len(data.table.label_names),
        "temperature": 1.0,
        "device": str(engine.device),
        "precision": engine.precision,
        "processes": engine.world,
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
    epoch_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    """How long the last epoch took, and how much of it the loop waited for data (not saved)."""

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
    config: Config, run_dir: Path, data: RunData, engine: Engine, resume: bool, progress: bool
) -> dict[str, Any]:
    """Train ``config.train.epochs`` epochs (or until early stopping); returns the best epoch's history row."""
    t = config.train
    state = start(config, run_dir, data, engine, resume)
    manifest = manifest_for(config, data, state.model, engine)
    log.info("training on %s", engine.describe())
    for epoch in range(state.epoch + 1, t.epochs):
        train_loss = train_epoch(config, state, data, engine, epoch, progress)
        scores = validate(state, data, engine)
        improved = record_epoch(config, state, epoch, train_loss, scores, str(engine.device))
        if engine.is_main:
            save_epoch(run_dir, state, manifest, scores, improved)
        engine.barrier()
        shown = " ".join(f"{k} {v:.4f}" for k, v in scores.items() if not math.isnan(v))
        log.info("epoch %d: train_loss %.4f %s%s", epoch, train_loss, shown, " (best)" if improved else "")
        if t.early_stopping and state.stale >= t.early_stopping:
            log.info("early stopping: %s has not improved for %d epochs", t.best_metric, state.stale)
            break
    sign = 1 if t.best_metric == "val_loss" else -1
    return min(state.history, key=lambda row: row[t.best_metric] * sign)


def start(config: Config, run_dir: Path, data: RunData, engine: Engine, resume: bool) -> TrainState:
    """A fresh state (seeded model, optimiser, scheduler, loss) on the engine's device, or with ``resume`` the one
    ``last/`` holds: weights loaded before the model moves, optimiser state after (it follows its parameters)."""
    t = config.train
    torch.manual_seed(t.seed)
    model = build_model(config, len(data.table.label_names))
    saved = _saved_state(run_dir) if resume else None
    if saved is not None:
        model.load_state_dict(load_weights(saved[0]))
    wrapped = engine.setup_module(model)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    if saved is not None:
        optimizer.load_state_dict(saved[1]["optimizer"])
        if scheduler is not None and saved[1].get("scheduler") is not None:
            scheduler.load_state_dict(saved[1]["scheduler"])
    loss_fn = make_loss(
        data.table.task, data.table.labels[data.splits["train"]], t.pos_weighting, t.class_weights, t.label_smoothing
    ).to(engine.device)
    state = TrainState(model, wrapped, engine.setup_optimizer(optimizer), scheduler, loss_fn)
    if saved is not None:
        state.epoch, state.history = saved[1]["epoch"], saved[1]["history"]
        state.best, state.stale = saved[1]["best"], saved[1]["stale"]
        log.info("resuming %s after epoch %d", run_dir, state.epoch)
    return state


def _saved_state(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``last/`` (or what a crash between the two renames of its write left) and its training state."""
    last = run_dir / LAST_DIR
    if not last.exists() and (run_dir / f"{LAST_DIR}.old").exists():
        last = run_dir / f"{LAST_DIR}.old"
    if not last.exists():
        log.info("nothing to resume in %s: starting from epoch 0", run_dir)
        return None
    return last, load_training_state(last)


def train_epoch(
    config: Config, state: TrainState, data: RunData, engine: Engine, epoch: int, progress: bool
) -> float:
    """One pass over the training split; returns the mean training loss across ranks.

    The loss is summed on the device and read back only when the progress bar refreshes: no step waits for
    the host.
    """
    t = config.train
    # Every random draw of an epoch derives from (seed, epoch, rank): resuming at an epoch boundary
    # replays exactly what an unbroken run would have done.
    torch.manual_seed(t.seed * 100_003 + epoch * 1_009 + engine.rank)
    generator = device_generator(engine.device, t.seed * 7_919 + epoch * 31 + engine.rank)
    rows = data.splits["train"][epoch_order(len(data.splits["train"]), t.seed, epoch)]
    # A tail too short to give every rank a row is dropped (the same decision on every rank). Each rank takes
    # an interleaved share of the global batch and weighs its mean loss by its share, so DDP's gradient
    # average equals the gradient of the global batch's mean loss.
    steps = [batch for batch in batches(rows, t.batch_size) if len(batch) >= engine.world]
    shares = [batch[engine.rank :: engine.world] for batch in steps]
    feed = DeviceBatches(lambda chunk: _host_batch(data, chunk), shares, engine.device)
    state.wrapped.train()
    total = torch.zeros((), dtype=torch.float32, device=engine.device)
    count = 0
    started = time.perf_counter()
    bar = tqdm(total=len(rows), desc=f"epoch {epoch + 1}/{t.epochs}", unit="img", disable=not progress, leave=False)
    with bar:  # closed on an error too, so the error's line is not glued to the bar's
        for step, ((images, labels, chunk), batch) in enumerate(zip(feed, steps, strict=True)):
            weight = len(chunk) * engine.world / len(batch)
            try:
                loss = train_step(state, engine, images, labels, t.augment, t.augment_strength, generator, weight)
            except torch.OutOfMemoryError:
                raise _out_of_memory(config, state, data, engine, generator, len(batch)) from None
            total += loss.detach() * len(chunk)
            count += len(chunk)
            bar.update(len(batch))
            if progress and step % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{float(total) / count:.4f}")
    state.epoch_seconds, state.data_wait_seconds = time.perf_counter() - started, feed.waited
    return _mean_across_ranks(engine, total, count)


def train_step(
    state: TrainState,
    engine: Engine,
    images: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    strength: float,
    generator: torch.Generator,
    weight: float = 1.0,
) -> torch.Tensor:
    """One optimiser step on a uint8 batch already on the device: normalise, augment, forward, loss, backward,
    step, all there. Returns the batch's mean loss, still on the device."""
    x = to_input(images, state.model.mean, state.model.std)
    x = augment(x, kind, strength, generator).contiguous(memory_format=torch.channels_last)
    loss = state.loss_fn(state.wrapped(x).float(), labels)
    state.optimizer.zero_grad(set_to_none=True)
    engine.backward(loss * weight)
    state.optimizer.step()
    return loss


def _out_of_memory(
    config: Config, state: TrainState, data: RunData, engine: Engine, generator: torch.Generator, failed: int
) -> Exception:
    """The error for a training batch that did not fit, with a batch size that does, found by halving.

    The trial steps change the weights in memory only: the checkpoints on disk are the last epoch's, and
    ``--resume`` continues from them.
    """
    t = config.train

    def runs(size: int) -> None:
        rows = data.splits["train"][: size // engine.world or 1]
        images, labels = (torch.from_numpy(np.ascontiguousarray(a)).to(engine.device) for a in _host_batch(data, rows))
        train_step(state, engine, images, labels, t.augment, t.augment_strength, generator)

    fits = fitting_batch_size(runs, failed)
    advice = f"continue with --resume --set train.batch_size={fits}"
    return out_of_memory(engine.device, failed, fits, advice)


def _host_batch(data: RunData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images and the labels of table ``rows``, from the memory-mapped cache."""
    return data.cache.images[data.cache_rows[rows]], data.table.labels[rows]


def _mean_across_ranks(engine: Engine, total: torch.Tensor, count: int) -> float:
    sums = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
    sums = engine.sum_across_ranks(sums)
    return float(sums[0]) / max(float(sums[1]), 1.0)


@torch.no_grad()
def predict_rows(
    model: nn.Module, data: RunData, rows: np.ndarray, engine: Engine, batch_size: int = 64
) -> torch.Tensor:
    """Logits for ``rows`` of the table, computed across ranks and gathered in order, on the engine's device."""
    model.eval()
    mine = shard(rows, engine.rank, engine.world)
    feed = DeviceBatches(lambda chunk: _host_batch(data, chunk), list(batches(mine, batch_size)), engine.device)
    outputs = []
    for images, _, _ in feed:
        x = to_input(images, model.mean, model.std).contiguous(memory_format=torch.channels_last)
        with engine.autocast():
            outputs.append(model(x).float())
    logits = torch.cat(outputs) if outputs else torch.empty(0, len(data.table.label_names), device=engine.device)
    return engine.gather_rows(logits, len(rows))


def validation_outputs(state: TrainState, data: RunData, engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split's logits and mean loss, both on the device (nothing read back to the host)."""
    rows = data.splits["val"]
    logits = predict_rows(state.model, data, rows, engine)
    labels = torch.from_numpy(data.table.labels[rows]).to(logits.device, non_blocking=True)
    return logits, state.loss_fn(logits, labels)


def validate(state: TrainState, data: RunData, engine: Engine) -> dict[str, float]:
    """Validation loss, macro AUC and (multi-class) accuracy of the model as it is now."""
    logits, loss = validation_outputs(state, data, engine)
    probs = probabilities(logits, data.table.task).cpu().numpy()
    labels = data.table.labels[data.splits["val"]]
    return {"val_loss": float(loss), **validation_scores(data.table.task, labels, probs)}


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
    config: Config, state: TrainState, epoch: int, train_loss: float, scores: dict[str, float], device: str = "cpu"
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
    state.history.append({"epoch": epoch, "train_loss": train_loss, **scores, "lr": max(lrs), "device": device})
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
