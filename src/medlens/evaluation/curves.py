"""The numbers behind the curve plots: per-label ROC and PR points, and a patient-bootstrap ROC band.

Same conventions as :mod:`medlens.evaluation.metrics` (N x K ``y_true`` with NaN unknown, multi-class as
one-hot rows scored one-vs-rest; an undefined curve has empty arrays and ``auc``/``ap`` None). The ROC band
resamples patients with the same draws as :func:`metrics.auc_ci` (same seed, same resamples), so the band
and the AUC interval in metrics.json describe the same bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from medlens.evaluation.metrics import as_arrays, check_task, ranking_targets, resample_weights

DEFAULT_FPR_GRID = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class RocCurve:
    """One label's ROC points, its AUC, and the bootstrap band of TPR on the fixed FPR ``grid``.

    ``tpr_lo``/``tpr_hi`` are None when the band is undefined (too few resamples with both classes).
    """

    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float | None
    grid: np.ndarray
    tpr_lo: np.ndarray | None
    tpr_hi: np.ndarray | None
    n_positive: int
    n_negative: int

    @property
    def defined(self) -> bool:
        return self.auc is not None


@dataclass(frozen=True)
class PrCurve:
    """One label's precision-recall points, average precision and prevalence (the no-skill line)."""

    label: str
    recall: np.ndarray
    precision: np.ndarray
    ap: float | None
    prevalence: float | None

    @property
    def defined(self) -> bool:
        return self.ap is not None


def _column(targets: np.ndarray, p: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray, bool]:
    known = np.isfinite(targets[:, j])
    y, scores = targets[known, j], p[known, j]
    n_positive = int((y == 1).sum())
    return y, scores, 0 < n_positive < len(y)


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR of an ROC curve (``fpr`` non-decreasing) at each FPR of ``grid``: the highest TPR reached at that
    FPR, linear between points (a diagonal segment is a run of tied scores)."""
    last = np.searchsorted(fpr, grid, side="right") - 1
    nxt = np.minimum(last + 1, len(fpr) - 1)
    span = fpr[nxt] - fpr[last]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(span > 0, (grid - fpr[last]) / span, 0.0)
    return tpr[last] + share * (tpr[nxt] - tpr[last])


def _bootstrap_tpr(y: np.ndarray, scores: np.ndarray, weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR on ``grid`` for each row of image weights (a resample); NaN rows where a class is missing."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tie_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    positive = y[order] == 1
    w = weights[:, order].astype(np.float64)
    tp = np.cumsum(np.add.reduceat(w * positive, tie_starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w * ~positive, tie_starts, axis=1), axis=1)
    out = np.full((len(w), len(grid)), np.nan)
    for r in range(len(w)):
        n_pos, n_neg = tp[r, -1], fp[r, -1]
        if n_pos > 0 and n_neg > 0:
            out[r] = tpr_at(np.r_[0.0, fp[r] / n_neg], np.r_[0.0, tp[r] / n_pos], grid)
    return out


def roc_curves(
    task: str,
    y_true: Any,
    y_prob: Any,
    label_names: Sequence[str],
    patient_ids: Any,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    min_defined: float = 0.5,
    grid: np.ndarray = DEFAULT_FPR_GRID,
) -> list[RocCurve]:
    """Per-label ROC curves with a (1 - alpha) pointwise percentile band of TPR over patient resamples.

    The band is None for a label whose curve is undefined, or where fewer than ``min_defined`` of the
    resamples hold both classes (the rule of :func:`metrics.auc_ci`).
    """
    check_task(task)
    y, p = as_arrays(y_true, y_prob, label_names)
    targets = ranking_targets(y, task)
    grid = np.asarray(grid, dtype=np.float64)
    columns = [_column(targets, p, j) for j in range(len(label_names))]
    known = [np.flatnonzero(np.isfinite(targets[:, j])) for j in range(len(label_names))]
    samples: list[list[np.ndarray]] = [[] for _ in label_names]
    if n_resamples > 0 and any(defined for _, _, defined in columns):
        for block in resample_weights(patient_ids, len(y), n_resamples, seed):
            for j, (yk, scores, defined) in enumerate(columns):
                if defined:
                    samples[j].append(_bootstrap_tpr(yk, scores, block[:, known[j]], grid))
    curves = []
    for j, name in enumerate(label_names):
        yk, scores, defined = columns[j]
        n_positive = int((yk == 1).sum())
        if not defined:
            empty = np.zeros(0)
            curves.append(RocCurve(name, empty, empty, None, grid, None, None, n_positive, len(yk) - n_positive))
            continue
        fpr, tpr, _ = roc_curve(yk, scores)
        lo, hi = _band(np.concatenate(samples[j]) if samples[j] else np.zeros((0, len(grid))), alpha, min_defined)
        auc = float(roc_auc_score(yk, scores))
        curves.append(RocCurve(name, fpr, tpr, auc, grid, lo, hi, n_positive, len(yk) - n_positive))
    return curves


def _band(values: np.ndarray, alpha: float, min_defined: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Pointwise percentile band over the defined rows (resamples), or (None, None) when too few are."""
    defined = values[np.isfinite(values).all(axis=1)]
    if len(values) == 0 or len(defined) < min_defined * len(values):
        return None, None
    lo, hi = np.percentile(defined, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo, hi


def pr_curves(task: str, y_true: Any, y_prob: Any, label_names: Sequence[str]) -> list[PrCurve]:
    """Per-label precision-recall curves on the known rows (one-vs-rest for multi-class)."""
    check_task(task)
    y, p = as_arrays(y_true, y_prob, label_names)
    targets = ranking_targets(y, task)
    curves = []
    for j, name in enumerate(label_names):
        yk, scores, defined = _column(targets, p, j)
        prevalence = float(yk.mean()) if len(yk) else None
        if not defined:
            empty = np.zeros(0)
            curves.append(PrCurve(name, empty, empty, None, prevalence))
            continue
        precision, recall, _ = precision_recall_curve(yk, scores)
        ap = float(average_precision_score(yk, scores))
        curves.append(PrCurve(name, recall, precision, ap, prevalence))
    return curves
