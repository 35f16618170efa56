"""The baseline beside every model: logistic regression on downsampled, standardised pixels.

A network that does not beat a linear model of 32 x 32 pixels, fitted on the same training images, has
learned little that the raw intensities (exposure, burned-in text, collimation, the hospital's film) do
not already say. :class:`PixelBaseline` follows the estimator contract (``fit`` returns self,
``predict_proba``, learned state ends in ``_``); :func:`compare_with_model` lays its AUCs beside a model's
metrics.json, per label and over the labels the model's AUC summary averages.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from medlens.evaluation.metrics import auc_per_label, class_indices, to_jsonable

BASELINE_SIZE = 32
"""Side in pixels of the images the baseline sees (1,024 features a grey image, 3,072 a colour one)."""
BASELINE_C = 1.0
MAX_ITER = 300


class PixelBaseline:
    """Logistic regression on flattened pixels, standardised on the training images.

    Multi-class: one multinomial model over the classes present in training. Multi-label: one binary model
    per label on the images where that label is known (NaN: unknown); a label without both a positive and a
    negative among them gets no model, and NaN probabilities.
    """

    def __init__(self, task: str, C: float = BASELINE_C, max_iter: int = MAX_ITER):
        self.task = task
        self.C = C
        self.max_iter = max_iter

    def fit(self, pixels: np.ndarray, labels: np.ndarray) -> PixelBaseline:
        x = self._features(pixels, fit=True)
        self.n_labels_ = labels.shape[1]
        # lbfgs may stop short of full convergence on 1,000+ correlated pixels; the baseline's AUCs barely move.
        # One BLAS thread: on matrices this small, threads only wait on each other (the demo's 5 labels on 650
        # images: 0.3 s instead of 7.4 on 2 cores), and the fit no longer depends on the machine's core count.
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.task == "multiclass":
                classes, known = class_indices(labels)
                self.models_: list[LogisticRegression | None] = [self._fit_one(x[known], classes[known])]
            else:
                self.models_ = [self._fit_label(x, labels[:, j]) for j in range(labels.shape[1])]
        return self

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """N x K probabilities; NaN in a column the training images could not fit."""
        x = self._features(pixels, fit=False)
        probs = np.full((len(x), self.n_labels_), np.nan)
        if self.task == "multiclass":
            model = self.models_[0]
            if model is not None:
                probs[:, model.classes_] = model.predict_proba(x)
            return probs
        for j, model in enumerate(self.models_):
            if model is not None:
                probs[:, j] = model.predict_proba(x)[:, 1]
        return probs

    @property
    def fitted_labels(self) -> np.ndarray:
        """Which columns have a model (multi-class: the classes seen in training)."""
        if self.task == "multiclass":
            fitted = np.zeros(self.n_labels_, dtype=bool)
            if self.models_[0] is not None:
                fitted[self.models_[0].classes_] = True
            return fitted
        return np.array([model is not None for model in self.models_])

    def _features(self, pixels: np.ndarray, fit: bool) -> np.ndarray:
        x = np.asarray(pixels, dtype=np.float32).reshape(len(pixels), -1) / 255.0
        if fit:
            self.scaler_ = StandardScaler().fit(x)
        return self.scaler_.transform(x)

    def _fit_one(self, x: np.ndarray, y: np.ndarray) -> LogisticRegression | None:
        if len(np.unique(y)) < 2:
            return None
        return LogisticRegression(C=self.C, max_iter=self.max_iter).fit(x, y)

    def _fit_label(self, x: np.ndarray, column: np.ndarray) -> LogisticRegression | None:
        known = np.isfinite(column)
        return self._fit_one(x[known], column[known].astype(np.int64))


def baseline_aucs(baseline: PixelBaseline, pixels: np.ndarray, y_true: np.ndarray) -> list[float | None]:
    """The baseline's AUC per label on the evaluated images; None where it has no model or the AUC is undefined."""
    probs = baseline.predict_proba(pixels)
    fitted = baseline.fitted_labels
    aucs = auc_per_label(y_true, np.nan_to_num(probs, nan=0.0), baseline.task)
    return [auc if fitted[j] else None for j, auc in enumerate(aucs)]


def compare_with_model(
    metrics: Mapping[str, Any], baseline: Sequence[float | None], n_train: int, size: int = BASELINE_SIZE
) -> dict[str, Any]:
    """metrics.json's ``baseline``: its AUC per label beside the model's, and over the labels both score
    among those the model's AUC summary averages (``auc_summary_over``).

    ``model_better`` per label is True when the model's AUC is higher, False when the baseline's is as high
    or higher, None where either is undefined; ``model_better_overall`` compares the two means the same way.
    """
    labels = list(metrics["labels"])
    model_auc = metrics["auc"]
    base_auc = dict(zip(labels, baseline, strict=True))
    scored = [name for name in labels if base_auc[name] is not None and model_auc[name] is not None]
    summarised = (metrics.get("auc_summary_over") or {}).get("labels", labels)
    compared = [name for name in scored if name in summarised]
    model_mean = float(np.mean([model_auc[n] for n in compared])) if compared else None
    base_mean = float(np.mean([base_auc[n] for n in compared])) if compared else None
    return to_jsonable(
        {
            "model": f"logistic regression on {size} x {size} standardised pixels (C={BASELINE_C:g})",
            "size": size,
            "n_train": n_train,
            "auc": base_auc,
            "scored": scored,
            "labels_compared": compared,
            "mean_auc": base_mean,
            "model_mean_auc": model_mean,
            "model_better": {name: (model_auc[name] > base_auc[name] if name in scored else None) for name in labels},
            "model_better_overall": None if model_mean is None else model_mean > base_mean,
        }
    )


def baseline_sentence(baseline: Mapping[str, Any] | None) -> str:
    """One sentence comparing the model with the pixel baseline (or saying why there is none)."""
    if not baseline:
        return "No pixel baseline."
    if baseline.get("omitted"):
        return f"No pixel baseline: {baseline['omitted']}."
    if baseline["model_better_overall"] is None:
        return "Pixel baseline: no label has an AUC for both the model and the baseline, so they cannot be compared."
    worse = [name for name, better in baseline["model_better"].items() if better is False]
    n = len(baseline["labels_compared"])
    verdict = "beats" if baseline["model_better_overall"] else "does NOT beat"
    text = (
        f"The model {verdict} the pixel baseline: mean AUC {baseline['model_mean_auc']:.3f} vs "
        f"{baseline['mean_auc']:.3f} over {n} label{'s' if n != 1 else ''}"
    )
    if worse:
        shown = ", ".join(worse[:4]) + (", ..." if len(worse) > 4 else "")
        text += f"; the baseline is as good or better on {len(worse)} ({shown})"
    return text + "."
