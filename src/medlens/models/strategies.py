"""Which weights train: the head only, everything, or the last N backbone blocks; and their learning rates."""

from __future__ import annotations

import logging
from typing import Any

from medlens.config import check_last_n
from medlens.errors import ConfigError
from medlens.models.classifier import Classifier

log = logging.getLogger(__name__)

STRATEGIES = ("head", "full", "last_n")


def apply_strategy(model: Classifier, strategy: str, last_n: int = 0) -> Classifier:
    """Freeze ``model`` for ``strategy``; the head always trains.

    ``head`` freezes the whole backbone, ``full`` trains everything, ``last_n`` trains the last ``last_n``
    of ``model.blocks()`` (a Keras "last 15 layers" on DenseNet-121 is about ``last_n=2``: two dense
    layers and the final norm). Frozen BatchNorm layers stay in eval mode through ``model.train()``.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    blocks = model.blocks()
    if strategy == "last_n" and not 1 <= last_n <= len(blocks):
        raise ConfigError(f"last_n must be between 1 and {len(blocks)} for {model.name}, got {last_n}")
    check_last_n(strategy, last_n)
    trained = {"head": 0, "full": len(blocks), "last_n": last_n}[strategy]
    for i, block in enumerate(blocks):
        block.requires_grad_(i >= len(blocks) - trained)
    model.head.requires_grad_(True)
    model.train(model.training)
    if strategy == "last_n":
        log.info("training the head and %s", ", ".join(block.name for block in blocks[-trained:]))
    return model


def param_groups(
    model: Classifier, lr: float, backbone_lr_mult: float = 1.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: backbone at ``lr * backbone_lr_mult``, head at ``lr``.

    With ``weight_decay``, biases, norms and the backbone's ``no_weight_decay()`` parameters (ViT position
    embeddings and class token) go in a group of their own without decay, as timm does.
    """
    if lr <= 0 or backbone_lr_mult < 0 or weight_decay < 0:
        raise ConfigError(
            f"need lr > 0, backbone_lr_mult >= 0 and weight_decay >= 0; got lr={lr}, "
            f"backbone_lr_mult={backbone_lr_mult}, weight_decay={weight_decay}"
        )
    exempt = set(model.backbone.no_weight_decay()) if hasattr(model.backbone, "no_weight_decay") else set()
    groups = []
    parts = (("backbone", model.backbone, lr * backbone_lr_mult), ("head", model.head, lr))
    for part, module, part_lr in parts:
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if param.requires_grad:
                skip = weight_decay and (param.ndim <= 1 or name in exempt)
                (no_decay if skip else decay).append(param)
        groups += [
            {"name": part, "params": decay, "lr": part_lr, "weight_decay": weight_decay},
            {"name": f"{part}_no_decay", "params": no_decay, "lr": part_lr, "weight_decay": 0.0},
        ]
    return [group for group in groups if group["params"]]
