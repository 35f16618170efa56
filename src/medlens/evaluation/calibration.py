"""Calibrating a trained model on its validation split: a temperature, operating thresholds, operating points.

The numbers come from :mod:`medlens.evaluation.metrics`; this module only decides what a checkpoint stores:
``temperature`` (the NLL-optimal T of the validation logits), ``thresholds`` (one per label, chosen on the
calibrated validation probabilities; 0.5 where a label has no positive or no negative there) and, for
multi-label models, ``operating_points`` (each label's validation sensitivity and specificity at its
threshold), which per-study reports quote beside every finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medlens.evaluation.metrics import apply_temperature, choose_thresholds, fit_temperature, multilabel_metrics

OPERATING_POINT_KEYS = ("sensitivity", "specificity", "n_positive", "n_known")


@dataclass(frozen=True)
class Calibration:
    """What a checkpoint's manifest stores after calibration, and the calibrated validation probabilities."""

    temperature: float
    thresholds: list[float]
    probs: np.ndarray
    operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)

    def manifest_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"temperature": self.temperature, "thresholds": self.thresholds}
        if self.operating_points:
            fields["operating_points"] = self.operating_points
        return fields


def calibrate(
    logits: np.ndarray, labels: np.ndarray, task: str, label_names: Sequence[str], threshold_method: str
) -> Calibration:
    """Fit the temperature on validation ``logits``, then thresholds and operating points on its probabilities."""
    temperature = float(fit_temperature(logits, labels, task))
    probs = apply_temperature(logits, temperature, task)
    thresholds = operating_thresholds(labels, probs, threshold_method)
    points = {}
    if task == "multilabel":
        points = operating_points(multilabel_metrics(labels, probs, list(label_names), thresholds)["per_class"])
    return Calibration(temperature, thresholds, probs, points)


def operating_thresholds(labels: np.ndarray, probs: np.ndarray, method: str) -> list[float]:
    """One threshold per output chosen on ``labels`` and ``probs`` by ``method``; 0.5 where none can be."""
    return [0.5 if t is None else float(t) for t in choose_thresholds(labels, probs, method=method)]


def operating_points(per_class: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each label's sensitivity, specificity and counts at its threshold, as a checkpoint's manifest stores them."""
    return {name: {key: point[key] for key in OPERATING_POINT_KEYS} for name, point in per_class.items()}
