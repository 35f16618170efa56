"""Losses for the two tasks: cross-entropy (multi-class) and frequency-weighted, NaN-masked BCE."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.data.splits import class_weights, positive_weights


class MaskedWeightedBCE(nn.Module):
    """BCE-with-logits where positives weigh ``pos_weight`` and negatives ``neg_weight`` per label.

    Unknown labels (NaN) contribute nothing; the mean is over known entries, so a batch with many
    unknowns is not down-weighted.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, neg_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.register_buffer("neg_weight", neg_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        target = torch.where(known, target, torch.zeros_like(target))
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.pos_weight is not None:
            loss = loss * (target * self.pos_weight + (1 - target) * self.neg_weight)
        return (loss * known).sum() / known.sum().clamp(min=1)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy on one-hot rows, with optional class weights and label smoothing."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = torch.nan_to_num(target).argmax(dim=1)
        return F.cross_entropy(logits, classes, weight=self.weight, label_smoothing=self.label_smoothing)


def make_loss(
    task: str, train_labels: np.ndarray, pos_weighting: bool, use_class_weights: bool, label_smoothing: float
) -> nn.Module:
    """The loss the config asks for, with weights computed from the training split's labels."""
    if task == "multilabel":
        if not pos_weighting:
            return MaskedWeightedBCE()
        pos, neg = positive_weights(train_labels)
        # Scaled by 2 so a balanced label keeps the plain BCE magnitude (weights 0.5 + 0.5 -> 1 + 1).
        return MaskedWeightedBCE(torch.from_numpy(2 * pos), torch.from_numpy(2 * neg))
    weight = torch.from_numpy(class_weights(train_labels)) if use_class_weights else None
    return SoftTargetCrossEntropy(weight, label_smoothing)
