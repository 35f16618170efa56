"""The numbers of an evaluation: AUC with patient-bootstrap CIs, operating points, calibration, subgroups.

Everything here returns numbers (floats, dicts, dataclasses of arrays); ``plots.py`` and the report draw
them. Conventions:

- ``y_true`` is an N x K float matrix, NaN meaning unknown. Multi-label: 0/1/NaN per label. Multi-class:
  one-hot rows; a row holding a NaN, or no positive entry, is unknown and skipped.
- ``y_prob`` is N x K: independent sigmoids (multi-label) or softmax rows (multi-class).
- A number that cannot be computed (a label with no positive or no negative among its known rows, a zero
  denominator, too few defined bootstrap resamples) is ``None``: never 0, 1 or NaN, so metrics.json says
  "cannot tell" instead of a misleading value.
- A prediction is positive when ``prob >= threshold``, as in ``medlens.inference`` and ``sklearn.metrics.roc_curve``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit, logsumexp, softmax
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

log = logging.getLogger(__name__)

TASKS = ("multilabel", "multiclass")
THRESHOLD_METHODS = ("youden", "sensitivity")
DEFAULT_AGE_BANDS = (0, 20, 40, 60, 80, 200)
MIN_POSITIVES = 5
"""Multi-label AUC summaries (min, max, mean, median) average only labels with at least this many positives
among the evaluated images: an AUC from two positives swings by 0.5 with one ranking."""
# Cells of one resample-by-image weight block in the bootstrap: bounds memory (~32 MB of float64).
_BOOTSTRAP_BLOCK_CELLS = 4_000_000


# ---------------------------------------------------------------------------------------------- inputs


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def as_arrays(
    y_true: Any, y_prob: Any, label_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices as float64 N x K, checked against each other and the label list."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y_true and y_prob must both be N x K; got {y.shape} and {p.shape}")
    if label_names is not None and len(label_names) != y.shape[1]:
        raise ValueError(f"{len(label_names)} label names for {y.shape[1]} columns")
    if not np.isfinite(p).all():
        raise ValueError(f"y_prob holds {int((~np.isfinite(p)).sum())} NaN/inf values; scores must be finite")
    return y, p


def class_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-class one-hot rows -> (class index per row, known mask); unknown rows get index -1."""
    known = np.isfinite(y).all(axis=1) & (np.nan_to_num(y).max(axis=1, initial=0.0) > 0)
    classes = np.where(known, np.nan_to_num(y).argmax(axis=1), -1)
    return classes, known


def ranking_targets(y: np.ndarray, task: str) -> np.ndarray:
    """The 0/1/NaN matrix that per-column AUC/AP read: the labels, or one-vs-rest columns of the classes."""
    if task == "multilabel":
        return y
    classes, known = class_indices(y)
    targets = np.full(y.shape, np.nan)
    targets[known] = np.eye(y.shape[1])[classes[known]]
    return targets


def _resolve_thresholds(thresholds: Sequence[float | None] | None, n_labels: int) -> list[float]:
    if thresholds is None:
        return [0.5] * n_labels
    if len(thresholds) != n_labels:
        raise ValueError(f"{len(thresholds)} thresholds for {n_labels} labels")
    return [0.5 if t is None else float(t) for t in thresholds]


# ---------------------------------------------------------------------------------------------- pieces


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _summary(values: Sequence[float | None]) -> dict[str, float | None]:
    """min / max / mean / median over the defined values (all None when none is defined)."""
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    if defined.size == 0:
        return {"min": None, "max": None, "mean": None, "median": None}
    return {
        "min": float(defined.min()),
        "max": float(defined.max()),
        "mean": float(defined.mean()),
        "median": float(np.median(defined)),
    }


def summarised_labels(
    y: np.ndarray, names: Sequence[str], aucs: Sequence[float | None], min_positives: int
) -> dict[str, Any]:
    """Which labels an AUC summary averages: those with a defined AUC and at least ``min_positives`` positives."""
    positives = (np.nan_to_num(y, nan=0.0) == 1).sum(axis=0)
    included = [n for n, auc, k in zip(names, aucs, positives, strict=True) if auc is not None and k >= min_positives]
    return {
        "min_positives": min_positives,
        "labels": included,
        "excluded": [name for name in names if name not in included],
    }


def _known_binary(y_col: np.ndarray, p_col: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Known rows of one column, and whether both classes are present (AUC, AP, thresholds need both)."""
    known = np.isfinite(y_col)
    y, p = y_col[known], p_col[known]
    n_positive = int((y == 1).sum())
    return y, p, 0 < n_positive < len(y)


def _ranking_scores(y: np.ndarray, p: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """ROC AUC and average precision per column on its known rows; None where a class is missing."""
    aucs: list[float | None] = []
    aps: list[float | None] = []
    for j in range(y.shape[1]):
        yk, pk, defined = _known_binary(y[:, j], p[:, j])
        aucs.append(float(roc_auc_score(yk, pk)) if defined else None)
        aps.append(float(average_precision_score(yk, pk)) if defined else None)
    return aucs, aps


def auc_per_label(y_true: Any, y_prob: Any, task: str) -> list[float | None]:
    """ROC AUC per column (one-vs-rest for multi-class) on its known rows; None where a class is missing."""
    y, p = as_arrays(y_true, y_prob)
    return _ranking_scores(ranking_targets(y, task), p)[0]


def _operating_point(y_col: np.ndarray, p_col: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates of one label at ``prob >= threshold`` on its known rows."""
    known = np.isfinite(y_col)
    truth = y_col[known] == 1
    called = p_col[known] >= threshold
    tp = int((truth & called).sum())
    fp = int((~truth & called).sum())
    fn = int((truth & ~called).sum())
    tn = int((~truth & ~called).sum())
    return {
        "n_known": int(known.sum()),
        "n_positive": tp + fn,
        "threshold": float(threshold),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


# ---------------------------------------------------------------------------------------------- per task


def multilabel_metrics(
    y_true: Any,
    y_prob: Any,
    label_names: Sequence[str],
    thresholds: Sequence[float | None] | None = None,
    min_positives: int = MIN_POSITIVES,
) -> dict[str, Any]:
    """Per-label AUC, AP and operating-point metrics (threshold 0.5 where none is given).

    Returns ``labels``, ``auc`` and ``ap`` (label -> float or None), ``auc_summary`` ({min, max, mean,
    median} over the defined AUCs of labels with at least ``min_positives`` positives), ``auc_summary_over``
    (that N, the labels averaged and those left out), ``macro_auc`` (the mean over every defined AUC, what
    training, cross-validation and tuning compare), ``thresholds`` (label -> float) and ``per_class``
    (label -> n_known, n_positive, threshold, sensitivity, specificity, ppv, npv, f1 and ``confusion``
    {tp, fp, fn, tn}).
    """
    y, p = as_arrays(y_true, y_prob, label_names)
    names = list(label_names)
    cutoffs = _resolve_thresholds(thresholds, len(names))
    aucs, aps = _ranking_scores(y, p)
    over = summarised_labels(y, names, aucs, min_positives)
    return {
        "labels": names,
        "auc": dict(zip(names, aucs, strict=True)),
        "ap": dict(zip(names, aps, strict=True)),
        "auc_summary": _summary([auc for name, auc in zip(names, aucs, strict=True) if name in over["labels"]]),
        "auc_summary_over": over,
        "macro_auc": _mean_defined(aucs),
        "thresholds": dict(zip(names, cutoffs, strict=True)),
        "per_class": {name: _operating_point(y[:, j], p[:, j], cutoffs[j]) for j, name in enumerate(names)},
    }


def top_k_accuracy(classes: np.ndarray, probs: np.ndarray, k: int) -> float | None:
    """Share of rows whose true class is among the k highest scores (ties: the lower class index first)."""
    if len(classes) == 0:
        return None
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((ranked == classes[:, None]).any(axis=1).mean())


def multiclass_metrics(
    y_true: Any,
    y_prob: Any,
    label_names: Sequence[str],
    top_k: Sequence[int] = (1, 3, 5),
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, top-k, per-class report, confusion and one-vs-rest AUC of the top class.

    The predicted class is the argmax (the first on ties). Returns ``labels``, ``n_known``, ``accuracy``,
    ``balanced_accuracy`` (mean recall over classes with support), ``top_k`` ({"top_3": ...} for each
    k < K), ``per_class`` (label -> precision, recall, f1, support, as sklearn's classification_report but
    None for a zero denominator), ``macro_avg`` (mean of the defined per-class values), ``confusion``
    (K x K counts, rows = true class, columns = predicted), ``confusion_normalized`` (each row divided by
    its support; a class with no support has a row of None), ``auc``/``ap`` (one-vs-rest; None when the
    class is absent or is every known row), ``auc_summary`` and ``macro_auc``.
    """
    y, p = as_arrays(y_true, y_prob, label_names)
    names = list(label_names)
    n_classes = len(names)
    classes, known = class_indices(y)
    truth = classes[known]
    probs = p[known]
    predicted = probs.argmax(axis=1)
    confusion = np.bincount(truth * n_classes + predicted, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    support = confusion.sum(axis=1)
    called = confusion.sum(axis=0)
    hits = np.diag(confusion)
    precision = [_ratio(hits[c], called[c]) for c in range(n_classes)]
    recall = [_ratio(hits[c], support[c]) for c in range(n_classes)]
    f1 = [_ratio(2 * hits[c], support[c] + called[c]) for c in range(n_classes)]
    normalized = [
        [float(v) / support[c] for v in confusion[c]] if support[c] else [None] * n_classes
        for c in range(n_classes)
    ]
    aucs, aps = _ranking_scores(ranking_targets(y, "multiclass"), p)
    return {
        "labels": names,
        "n_known": int(known.sum()),
        "accuracy": _ratio(hits.sum(), len(truth)),
        "balanced_accuracy": _mean_defined(recall),
        "top_k": {f"top_{k}": top_k_accuracy(truth, probs, k) for k in top_k if k < n_classes},
        "per_class": {
            name: {"precision": precision[c], "recall": recall[c], "f1": f1[c], "support": int(support[c])}
            for c, name in enumerate(names)
        },
        "macro_avg": {
            "precision": _mean_defined(precision),
            "recall": _mean_defined(recall),
            "f1": _mean_defined(f1),
        },
        "confusion": confusion.tolist(),
        "confusion_normalized": normalized,
        "auc": dict(zip(names, aucs, strict=True)),
        "ap": dict(zip(names, aps, strict=True)),
        "auc_summary": _summary(aucs),
        "auc_summary_over": summarised_labels(ranking_targets(y, "multiclass"), names, aucs, 1),
        "macro_auc": _mean_defined(aucs),
    }


# ---------------------------------------------------------------------------------------------- bootstrap


def resample_weights(patient_ids: Any, n_images: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks (resamples x images) of how often each image is drawn when patients are drawn with replacement.

    Every image of a drawn patient comes along, once per draw of that patient (CheXNet's resampling).
    Both the generic and the fast AUC bootstrap read these blocks, so the same seed gives the same draws.
    """
    ids = np.asarray(patient_ids).astype(str)
    if ids.shape != (n_images,):
        raise ValueError(f"patient_ids must have one entry per image ({n_images}); got shape {ids.shape}")
    _, patient_of_image = np.unique(ids, return_inverse=True)
    n_patients = int(patient_of_image.max()) + 1 if n_images else 0
    if n_patients == 0:
        return
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, _BOOTSTRAP_BLOCK_CELLS // max(n_images, n_patients, 1)))
    for start in range(0, n_resamples, block):
        size = min(block, n_resamples - start)
        draws = rng.integers(0, n_patients, size=(size, n_patients))
        offsets = n_patients * np.arange(size)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n_patients).reshape(size, n_patients)
        yield counts[:, patient_of_image]


def _percentile_interval(values: np.ndarray, alpha: float, min_defined: float) -> tuple[float, float] | None:
    """Percentile interval of the defined (non-NaN) resample values, or None when too few are defined."""
    defined = values[np.isfinite(values)]
    if len(values) == 0 or len(defined) < min_defined * len(values):
        return None
    lo, hi = np.percentile(defined, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    y_true: Any,
    y_prob: Any,
    patient_ids: Any,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    min_defined: float = 0.5,
) -> tuple[float, float] | None:
    """Percentile CI of ``metric_fn(y_true, y_prob)`` over resamples of patients drawn with replacement.

    Resamples where the metric is undefined (None or NaN) are skipped; when fewer than ``min_defined`` of
    them are defined the interval is None. One call of ``metric_fn`` per resample: for per-label AUC,
    :func:`auc_ci` gives the same intervals (same draws for the same seed) much faster.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    images = np.arange(len(y))
    values = []
    for block in resample_weights(patient_ids, len(y), n_resamples, seed):
        for weights in block:
            drawn = np.repeat(images, weights)
            value = metric_fn(y[drawn], p[drawn])
            values.append(np.nan if value is None else float(value))
    return _percentile_interval(np.asarray(values, dtype=np.float64), alpha, min_defined)


def _weighted_auc(weights: np.ndarray, positive: np.ndarray, tie_starts: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row of image weights (images sorted by score; ties count one half).

    Equals ``roc_auc_score`` on the data with each image repeated ``weight`` times; NaN where a resample
    has no positive or no negative.
    """
    pos = np.add.reduceat(weights * positive, tie_starts, axis=1)
    neg = np.add.reduceat(weights * ~positive, tie_starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def auc_ci(
    y_true: Any,
    y_prob: Any,
    patient_ids: Any,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    min_defined: float = 0.5,
) -> list[tuple[float, float] | None]:
    """Per-column ROC AUC CIs from the patient bootstrap of :func:`bootstrap_ci`, vectorised over resamples.

    ``y_true`` is a 0/1/NaN matrix (for multi-class pass one-vs-rest columns, NaN rows unknown); each
    column uses its known rows. None for a column whose AUC is undefined or too rarely defined.
    """
    values, defined = auc_resamples(y_true, y_prob, patient_ids, n_resamples, seed)
    return [
        _percentile_interval(v, alpha, min_defined) if d else None for v, d in zip(values, defined, strict=True)
    ]


def auc_resamples(
    y_true: Any, y_prob: Any, patient_ids: Any, n_resamples: int = 1000, seed: int = 0
) -> tuple[np.ndarray, list[bool]]:
    """The per-column AUC of every patient resample (K x resamples, NaN where undefined) behind :func:`auc_ci`,
    and whether each column's AUC is defined at all; a macro AUC's interval averages these columns."""
    y, p = as_arrays(y_true, y_prob)
    columns = []
    for j in range(y.shape[1]):
        rows = np.flatnonzero(np.isfinite(y[:, j]))
        rows = rows[np.argsort(p[rows, j], kind="stable")]
        scores = p[rows, j]
        tie_starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]]) if len(rows) else rows
        positive = y[rows, j] == 1
        defined = 0 < positive.sum() < len(rows)
        columns.append((rows, positive, tie_starts) if defined else None)
    values = np.full((y.shape[1], n_resamples), np.nan)
    done = 0
    for block in resample_weights(patient_ids, len(y), n_resamples, seed):
        for j, column in enumerate(columns):
            if column is not None:
                rows, positive, tie_starts = column
                values[j, done : done + len(block)] = _weighted_auc(
                    block[:, rows].astype(np.float64), positive, tie_starts
                )
        done += len(block)
    return values, [c is not None for c in columns]


# ---------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityCurve:
    """Equal-width confidence bins on [0, 1]: observed accuracy vs mean confidence (NaN in empty bins)."""

    centres: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float | None:
        """Expected calibration error: the count-weighted mean gap |accuracy - confidence| over bins."""
        total = self.counts.sum()
        if total == 0:
            return None
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] * gaps).sum() / total)


def _calibration_pairs(y: np.ndarray, p: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs: each known (image, label) (multi-label) or the top class (multi-class)."""
    check_task(task)
    if task == "multilabel":
        known = np.isfinite(y)
        return p[known], y[known]
    classes, known = class_indices(y)
    probs = p[known]
    return probs.max(axis=1), (probs.argmax(axis=1) == classes[known]).astype(np.float64)


def reliability_curve(y_true: Any, y_prob: Any, task: str, n_bins: int = 15) -> ReliabilityCurve:
    """Reliability diagram numbers, binned as in Guo et al. 2017.

    Multi-class: confidence of the top class vs whether it is right. Multi-label: every known (image,
    label) pair, its probability vs its 0/1 label (the calibration of each sigmoid, pooled over labels).
    """
    y, p = as_arrays(y_true, y_prob)
    confidence, outcome = _calibration_pairs(y, p, task)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.bincount(bins, weights=outcome, minlength=n_bins) / counts
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
    centres = (np.arange(n_bins) + 0.5) / n_bins
    return ReliabilityCurve(centres, accuracy, mean_confidence, counts)


def expected_calibration_error(y_true: Any, y_prob: Any, task: str, n_bins: int = 15) -> float | None:
    """ECE over ``n_bins`` equal-width bins (see :func:`reliability_curve` for what is binned per task)."""
    return reliability_curve(y_true, y_prob, task, n_bins).ece


def _nll(logits: np.ndarray, y: np.ndarray, task: str, temperature: float) -> float:
    """Mean BCE over known (image, label) pairs (multi-label) or mean CE over known rows (multi-class)."""
    if task == "multilabel":
        known = np.isfinite(y)
        z, t = logits[known] / temperature, y[known]
        return float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    classes, known = class_indices(y)
    z = logits[known] / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), classes[known]]))


def fit_temperature(logits: Any, y_true: Any, task: str, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising validation NLL of ``logits / T`` (a bounded search over log T).

    1.0 when there is no known label to fit on.
    """
    check_task(task)
    y, z = as_arrays(y_true, logits)
    if not np.isfinite(ranking_targets(y, task)).any():
        log.warning("no known labels to fit a temperature on: keeping T = 1")
        return 1.0
    found = minimize_scalar(
        lambda log_t: _nll(z, y, task, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(found.x))


def apply_temperature(logits: Any, temperature: float, task: str) -> np.ndarray:
    """Probabilities of ``logits / temperature``: sigmoids (multi-label) or softmax rows (multi-class)."""
    check_task(task)
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return expit(scaled) if task == "multilabel" else softmax(scaled, axis=1)


# ---------------------------------------------------------------------------------------------- thresholds


def choose_thresholds(
    y_true: Any, y_prob: Any, method: str = "youden", target_sensitivity: float = 0.9
) -> list[float | None]:
    """One operating threshold per column, chosen on validation data (positive means ``prob >= t``).

    ``youden``: the threshold maximising sensitivity + specificity - 1 (the highest one on ties).
    ``sensitivity``: the highest threshold whose sensitivity reaches ``target_sensitivity``.
    None for a column without both positives and negatives among its known rows: the caller decides the
    fallback (training stores 0.5).
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {THRESHOLD_METHODS}, got {method!r}")
    y, p = as_arrays(y_true, y_prob)
    chosen: list[float | None] = []
    for j in range(y.shape[1]):
        yk, pk, defined = _known_binary(y[:, j], p[:, j])
        if not defined:
            chosen.append(None)
            continue
        fpr, tpr, cutoffs = roc_curve(yk, pk, drop_intermediate=False)
        # The first point is the threshold +inf that calls nothing positive: never an operating point.
        fpr, tpr, cutoffs = fpr[1:], tpr[1:], cutoffs[1:]
        best = np.argmax(tpr - fpr) if method == "youden" else np.argmax(tpr >= target_sensitivity)
        chosen.append(float(cutoffs[best]))
    return chosen


# ---------------------------------------------------------------------------------------------- subgroups


def _age_band_names(edges: Sequence[float]) -> list[str]:
    names = [f"{int(lo)}-{int(hi) - 1}" for lo, hi in itertools.pairwise(edges)]
    names[-1] = f"{int(edges[-2])}+"
    return names


def _group_values(frame: pd.DataFrame, column: str, age_bands: Sequence[float]) -> pd.Series:
    """The group of each image under ``column`` as text; ``age`` is banded ("40-59", last band "80+")."""
    values = frame[column].reset_index(drop=True)
    if column != "age":
        return values.map(lambda v: str(v) if pd.notna(v) else None)
    ages = pd.to_numeric(values, errors="coerce")
    names = _age_band_names(age_bands)
    bands = pd.cut(ages, bins=list(age_bands), right=False, labels=names)
    return bands.astype(object).where(bands.notna(), None)


def _group_order(values: pd.Series, column: str, age_bands: Sequence[float]) -> list[str]:
    present = set(values.dropna())
    if column == "age":
        return [name for name in _age_band_names(age_bands) if name in present]
    return sorted(present)


def column_groups(
    frame: pd.DataFrame, column: str, age_bands: Sequence[float] = DEFAULT_AGE_BANDS
) -> list[tuple[str, np.ndarray]]:
    """Each group of ``column`` (``age`` banded) in order, with the boolean mask of its rows."""
    values = _group_values(frame, column, age_bands)
    return [(value, (values == value).to_numpy()) for value in _group_order(values, column, age_bands)]


def _group_summary(
    task: str, y: np.ndarray, p: np.ndarray, names: list[str], thresholds: Sequence[float | None] | None
) -> dict[str, Any]:
    """Compact per-group numbers: AUCs plus operating-point rates (multi-label) or accuracy (multi-class)."""
    if task == "multilabel":
        full = multilabel_metrics(y, p, names, thresholds)
        return {
            "auc": full["auc"],
            "macro_auc": full["macro_auc"],
            "sensitivity": {name: full["per_class"][name]["sensitivity"] for name in names},
            "specificity": {name: full["per_class"][name]["specificity"] for name in names},
        }
    full = multiclass_metrics(y, p, names, top_k=())
    return {
        "accuracy": full["accuracy"],
        "balanced_accuracy": full["balanced_accuracy"],
        "auc": full["auc"],
        "macro_auc": full["macro_auc"],
        "recall": {name: full["per_class"][name]["recall"] for name in names},
    }


def subgroup_metrics(
    frame: pd.DataFrame,
    columns: Sequence[str],
    task: str,
    y_true: Any,
    y_prob: Any,
    label_names: Sequence[str],
    thresholds: Sequence[float | None] | None = None,
    age_bands: Sequence[float] = DEFAULT_AGE_BANDS,
    min_size: int = 5,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics per value of each column of ``frame`` (one row per image, in the order of ``y_true``).

    Returns ``{column: {value: {"n_images": n, "metrics": {...} or None}}}``. Columns absent from
    ``frame`` are skipped; images with a missing value are in no group of that column; an ``age`` column
    is banded by ``age_bands`` (edges, left-closed: "0-19", ..., "80+"). Groups smaller than
    ``min_size`` keep their count with metrics None. Multi-label metrics: auc, macro_auc, sensitivity and
    specificity per label at ``thresholds``; multi-class: accuracy, balanced_accuracy, auc, macro_auc and
    recall per class.
    """
    check_task(task)
    y, p = as_arrays(y_true, y_prob, label_names)
    if len(frame) != len(y):
        raise ValueError(f"frame has {len(frame)} rows for {len(y)} images; it must be one row per image")
    names = list(label_names)
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for column in columns:
        if column not in frame.columns:
            continue
        groups = {}
        for value, rows in column_groups(frame, column, age_bands):
            n = int(rows.sum())
            metrics = _group_summary(task, y[rows], p[rows], names, thresholds) if n >= min_size else None
            groups[value] = {"n_images": n, "metrics": metrics}
        result[column] = groups
    return result


# ---------------------------------------------------------------------------------------------- metrics.json


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to floats/lists, NaN/inf to None, dataclasses to dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate_predictions(
    task: str,
    y_true: Any,
    y_prob: Any,
    label_names: Sequence[str],
    patient_ids: Any,
    thresholds: Sequence[float | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    frame: pd.DataFrame | None = None,
    subgroup_columns: Sequence[str] = (),
    alpha: float = 0.05,
    n_bins: int = 15,
    min_positives: int = MIN_POSITIVES,
) -> dict[str, Any]:
    """The content of metrics.json, JSON-ready (plain floats, None for undefined).

    Keys: task, labels, n_images, n_patients, auc, auc_ci (label -> [lo, hi] or None), auc_summary,
    auc_summary_over (min_positives, the labels averaged, those excluded; multi-class: every class with a
    defined AUC), macro_auc, ap, accuracy, balanced_accuracy, top_k (None for multi-label), ece, reliability (bin
    centres, accuracy, confidence, counts), thresholds (label -> threshold for multi-label; None for
    multi-class, whose decision is the top class), per_class, subgroups, n_resamples, ci_level, seed; and
    for multi-class also macro_avg, confusion and confusion_normalized.
    """
    check_task(task)
    y, p = as_arrays(y_true, y_prob, label_names)
    names = list(label_names)
    ids = np.asarray(patient_ids).astype(str)
    if task == "multilabel":
        core = multilabel_metrics(y, p, names, thresholds, min_positives)
        extra: dict[str, Any] = {"accuracy": None, "balanced_accuracy": None, "top_k": None}
    else:
        core = multiclass_metrics(y, p, names)
        extra = {key: core[key] for key in ("accuracy", "balanced_accuracy", "top_k", "macro_avg")}
        extra |= {"confusion": core["confusion"], "confusion_normalized": core["confusion_normalized"]}
    intervals = auc_ci(ranking_targets(y, task), p, ids, n_resamples=n_resamples, seed=seed, alpha=alpha)
    curve = reliability_curve(y, p, task, n_bins)
    subgroups = (
        subgroup_metrics(frame, subgroup_columns, task, y, p, names, thresholds) if frame is not None else {}
    )
    result = {
        "task": task,
        "labels": names,
        "n_images": len(y),
        "n_patients": len(np.unique(ids)),
        "auc": core["auc"],
        "auc_ci": dict(zip(names, intervals, strict=True)),
        "auc_summary": core["auc_summary"],
        "auc_summary_over": core["auc_summary_over"],
        "macro_auc": core["macro_auc"],
        "ap": core["ap"],
        **extra,
        "ece": curve.ece,
        "reliability": curve,
        "thresholds": core["thresholds"] if task == "multilabel" else None,
        "per_class": core["per_class"],
        "subgroups": subgroups,
        "n_resamples": n_resamples,
        "ci_level": 1 - alpha,
        "seed": seed,
    }
    return to_jsonable(result)
