"""Classifiers over face embeddings, with the scikit-learn estimator contract and pickle-free saving.

Every head takes N x D embeddings, scales each row to unit length (dlib descriptors and pooled backbone
features compare by angle, not by length), and learns class logits: a linear SVM (one-vs-rest, the seed's
head), a multinomial logistic regression (``logreg``), an MLP of fully-connected ReLU layers
(scikit-learn's MLPClassifier), or k nearest neighbours (``knn``).
``predict_proba`` is ``softmax(logits / temperature_)`` over every class, rows summing to 1. The
temperature is fitted on out-of-fold logits (``calibration_folds``-fold cross-validation of the same head)
before the head is refitted on all rows, as CalibratedClassifierCV(ensemble=False) does; this turns SVM
margins into probabilities and tames an MLP's over-confidence.

The learned arrays are plain numpy, so a head is saved as ``model.safetensors`` + ``manifest.json``
(hyper-parameters and classes) through the checkpoint writer and reloads to the same probabilities.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from medlens.errors import CheckpointError, ConfigError, DataSourceError, MedlensError
from medlens.evaluation.metrics import apply_temperature, fit_temperature
from medlens.models.checkpoint import load_weights, read_manifest, save_checkpoint

log = logging.getLogger(__name__)

HEAD_MODEL = "face-embedding-head"
"""``manifest["model"]["name"]`` of every saved head."""


def unit_rows(embeddings: Any) -> np.ndarray:
    """Embeddings as float64 N x D rows of length 1; NaN rows (images without an embedding) are refused."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected an N x D matrix of embeddings, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise ValueError(f"{bad} embeddings hold NaN/inf (photos without a face?); drop those rows first")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class UnknownClassError(MedlensError, KeyError):
    """A class name that a head or gallery does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


class ProbabilityModel(Protocol):
    """Anything that maps embeddings to class probabilities: every head here, or a scikit-learn pipeline."""

    def predict_proba(self, X: Any) -> np.ndarray: ...


class _EmbeddingHead:
    """What all heads share; a head says only how to learn its arrays and compute logits from them."""

    name: ClassVar[str]
    _array_names: ClassVar[tuple[str, ...]]

    calibration_folds: int
    seed: int

    # ------------------------------------------------------------------------------ estimator contract

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's ``clone`` and grid search read them."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> Self:
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {key!r}; valid: {', '.join(valid)}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def fit(self, X: Any, y: Any) -> Self:
        """Learn from N x D embeddings and N class labels (names or integers); returns the head."""
        x = unit_rows(X)
        labels = np.asarray(y)
        if labels.shape != (len(x),):
            raise ValueError(f"y must hold one label per embedding ({len(x)}), got shape {labels.shape}")
        classes, codes = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise DataSourceError(f"a head needs at least 2 classes to tell apart, got {classes.tolist()}")
        # Embedding matrices are small: threads only contend for the cores (10x slower on a busy 2-core box).
        with threadpool_limits(limits=1):
            temperature = self._out_of_fold_temperature(x, codes, len(classes))
            self._learn(x, codes, len(classes))
        self.classes_ = classes
        self.n_features_in_ = x.shape[1]
        self.temperature_ = temperature
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Class logits (N x K) before temperature scaling."""
        self._check_fitted()
        x = unit_rows(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"embeddings have {x.shape[1]} features; this head was fitted on {self.n_features_in_}")
        return self._logits(x)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Calibrated probabilities of every class (N x K, columns in ``classes_`` order, rows sum to 1)."""
        return apply_temperature(self.decision_function(X), self.temperature_, "multiclass")

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy, as scikit-learn classifiers score."""
        return float(np.mean(self.predict(X) == np.asarray(y)))

    # ------------------------------------------------------------------------------ learned arrays

    def learned_arrays(self) -> dict[str, np.ndarray]:
        """Every learned number, by name (classes excepted, which are labels, not numbers)."""
        self._check_fitted()
        arrays = {name: getattr(self, name) for name in self._array_names}
        return {**arrays, "temperature_": np.array([self.temperature_])}

    def restore(self, classes: Sequence[Any], arrays: Mapping[str, np.ndarray]) -> Self:
        """Set the learned state from :meth:`learned_arrays` output and the class list."""
        missing = sorted({*self._array_names, "temperature_"} - set(arrays))
        if missing:
            raise CheckpointError(f"{type(self).__name__} weights lack {missing}")
        for name in self._array_names:
            setattr(self, name, np.asarray(arrays[name], dtype=np.float64))
        self.classes_ = np.asarray(classes)
        self.temperature_ = float(np.asarray(arrays["temperature_"]).reshape(-1)[0])
        self.n_features_in_ = self._input_size()
        return self

    # ------------------------------------------------------------------------------ per head

    def _learn(self, x: np.ndarray, codes: np.ndarray, n_classes: int) -> None:
        raise NotImplementedError

    def _logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _input_size(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ shared steps

    def _out_of_fold_temperature(self, x: np.ndarray, codes: np.ndarray, n_classes: int) -> float:
        folds = min(self.calibration_folds, int(np.bincount(codes).min()))
        if folds < 2:
            if self.calibration_folds >= 2:
                log.warning("a class has fewer than 2 examples: probabilities are not calibrated (temperature 1)")
            return 1.0
        logits = np.zeros((len(x), n_classes))
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
        for train, held_out in splitter.split(x, codes):
            fold = type(self)(**self.get_params())
            fold._learn(x[train], codes[train], n_classes)
            logits[held_out] = fold._logits(x[held_out])
        return fit_temperature(logits, np.eye(n_classes)[codes], "multiclass")

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(embeddings, labels) first")


class _LinearHead(_EmbeddingHead):
    """Heads whose logits are ``x @ coef_.T + intercept_``."""

    _array_names = ("coef_", "intercept_")

    def _estimator(self) -> Any:
        raise NotImplementedError

    def _learn(self, x: np.ndarray, codes: np.ndarray, n_classes: int) -> None:
        fitted = self._estimator().fit(x, codes)
        self.coef_, self.intercept_ = _logit_layer(fitted.coef_, fitted.intercept_)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef_.T + self.intercept_

    def _input_size(self) -> int:
        return int(self.coef_.shape[1])


class SVMHead(_LinearHead):
    """A linear SVM, one-vs-rest (LinearSVC); margins become probabilities by temperature scaling."""

    name = "svm"

    def __init__(self, C: float = 1.0, class_weight: str | None = None, calibration_folds: int = 5, seed: int = 0):
        self.C = C
        self.class_weight = class_weight
        self.calibration_folds = calibration_folds
        self.seed = seed

    def _estimator(self) -> LinearSVC:
        return LinearSVC(C=self.C, class_weight=self.class_weight, random_state=self.seed, max_iter=10_000)


class LogisticHead(_LinearHead):
    """Multinomial logistic regression (L2, lbfgs)."""

    name = "logreg"

    def __init__(self, C: float = 10.0, class_weight: str | None = None, calibration_folds: int = 5, seed: int = 0):
        self.C = C
        self.class_weight = class_weight
        self.calibration_folds = calibration_folds
        self.seed = seed

    def _estimator(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=2000)


class MLPHead(_EmbeddingHead):
    """Fully-connected ReLU layers then a softmax layer (MLPClassifier, adam, L2 ``alpha``)."""

    name = "mlp"
    _array_names = ()

    def __init__(
        self,
        hidden: Sequence[int] = (256,),
        alpha: float = 1e-3,
        max_iter: int = 500,
        calibration_folds: int = 5,
        seed: int = 0,
    ):
        self.hidden = hidden
        self.alpha = alpha
        self.max_iter = max_iter
        self.calibration_folds = calibration_folds
        self.seed = seed

    def _learn(self, x: np.ndarray, codes: np.ndarray, n_classes: int) -> None:
        fitted = MLPClassifier(
            hidden_layer_sizes=tuple(self.hidden), alpha=self.alpha, max_iter=self.max_iter, random_state=self.seed
        ).fit(x, codes)
        last_weights, last_bias = _logit_layer(fitted.coefs_[-1].T, fitted.intercepts_[-1])
        self.coefs_ = [*fitted.coefs_[:-1], last_weights.T]
        self.intercepts_ = [*fitted.intercepts_[:-1], last_bias]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        for weights, bias in zip(self.coefs_[:-1], self.intercepts_[:-1], strict=True):
            x = np.maximum(x @ weights + bias, 0.0)
        return x @ self.coefs_[-1] + self.intercepts_[-1]

    def _input_size(self) -> int:
        return int(self.coefs_[0].shape[0])

    def learned_arrays(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        layers = {f"coefs_{i}": w for i, w in enumerate(self.coefs_)}
        layers |= {f"intercepts_{i}": b for i, b in enumerate(self.intercepts_)}
        return {**layers, **super().learned_arrays()}

    def restore(self, classes: Sequence[Any], arrays: Mapping[str, np.ndarray]) -> Self:
        n_layers = sum(1 for key in arrays if key.startswith("coefs_"))
        if n_layers == 0:
            raise CheckpointError("MLPHead weights hold no layers (coefs_0, coefs_1, ...)")
        self.coefs_ = [np.asarray(arrays[f"coefs_{i}"], dtype=np.float64) for i in range(n_layers)]
        self.intercepts_ = [np.asarray(arrays[f"intercepts_{i}"], dtype=np.float64) for i in range(n_layers)]
        return super().restore(classes, arrays)


class KNNHead(_EmbeddingHead):
    """The ``k`` nearest training embeddings by cosine similarity vote; a class's probability is its (smoothed)
    share of the votes. Its "weights" are the training embeddings themselves."""

    name = "knn"
    _array_names = ("train_x_", "train_codes_", "class_count_")

    def __init__(self, k: int = 5, calibration_folds: int = 5, seed: int = 0):
        self.k = k
        self.calibration_folds = calibration_folds
        self.seed = seed

    def _learn(self, x: np.ndarray, codes: np.ndarray, n_classes: int) -> None:
        if self.k < 1:
            raise ConfigError(f"the knn head needs k of at least 1, got {self.k}")
        self.train_x_, self.train_codes_ = x, codes.astype(np.float64)
        self.class_count_ = np.array([float(n_classes)])

    def _logits(self, x: np.ndarray) -> np.ndarray:
        k = min(self.k, len(self.train_x_))
        nearest = np.argpartition(-(x @ self.train_x_.T), k - 1, axis=1)[:, :k]
        codes = self.train_codes_[nearest].astype(np.int64)
        n_classes = int(self.class_count_[0])
        votes = np.stack([np.bincount(row, minlength=n_classes) for row in codes]).astype(np.float64)
        return np.log((votes + 0.5) / (k + 0.5 * n_classes))  # softmax of these: the smoothed vote shares

    def _input_size(self) -> int:
        return int(self.train_x_.shape[1])


HEADS: dict[str, type[_EmbeddingHead]] = {head.name: head for head in (SVMHead, LogisticHead, MLPHead, KNNHead)}
"""Every head by the name configs and the CLI use."""


def list_heads() -> list[str]:
    return list(HEADS)


def create_head(name: str, **params: Any) -> _EmbeddingHead:
    """A new, unfitted head by name, e.g. ``create_head("svm", C=0.5)``; see :data:`REGULARISATION` for what a
    probe chooses by cross-validation."""
    if name not in HEADS:
        raise ConfigError(f"unknown face head {name!r}; valid heads: {', '.join(HEADS)}")
    try:
        return HEADS[name](**params)
    except TypeError as exc:
        valid = ", ".join(HEADS[name]().get_params())
        raise ConfigError(f"bad parameters for the {name} head ({exc}); valid parameters: {valid}") from None


REGULARISATION: dict[str, tuple[str, tuple[float, ...]]] = {
    "svm": ("C", (0.1, 1.0, 10.0)),
    "logreg": ("C", (0.1, 1.0, 10.0)),
    "mlp": ("alpha", (1e-4, 1e-3, 1e-2)),
    "knn": ("k", (1, 5, 15)),
}
"""Each head's regularisation parameter and the values a probe chooses among, by patient-grouped CV."""


def top_k(proba: Any, k: int, classes: Sequence[Any] | None = None) -> list[list[tuple[Any, float]]]:
    """The ``k`` most probable (class, probability) pairs of each row, best first (ties: lower column first).

    ``classes`` names the columns (default: their indices); ``k`` larger than the class count gives all.
    """
    p = np.atleast_2d(np.asarray(proba, dtype=np.float64))
    if k < 1:
        raise ConfigError(f"top-k needs k of at least 1, got {k}")
    names = list(classes) if classes is not None else list(range(p.shape[1]))
    if len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} class names for {p.shape[1]} probability columns")
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return [[(names[j], float(row[j])) for j in best] for row, best in zip(p, order, strict=True)]


EMBEDDER_PREFIX = "embedder."
"""Checkpoint keys of the embedder's own weights (a probe on a backbone keeps the backbone beside its head)."""


def save_head(
    head: _EmbeddingHead,
    folder: str | Path,
    manifest: Mapping[str, Any] | None = None,
    embedder: torch.nn.Module | None = None,
) -> Path:
    """Write a fitted head (and the weights of the ``embedder`` module it needs, if any) as a checkpoint folder
    (safetensors + JSON, atomically); ``manifest`` adds fields."""
    spec = {"name": HEAD_MODEL, "head": head.name, "params": head.get_params()}
    full = {**(manifest or {}), "model": spec, "labels": head.classes_.tolist()}
    module = _as_module(head.learned_arrays())
    if embedder is not None:
        module.add_module(EMBEDDER_PREFIX.rstrip("."), embedder)
    return save_checkpoint(folder, module, full)


def load_head(folder: str | Path, weights: Mapping[str, torch.Tensor] | None = None) -> _EmbeddingHead:
    """A head saved by :func:`save_head` (its checkpoint's ``weights`` when already read); nothing is unpickled."""
    manifest = read_manifest(folder)
    spec = manifest["model"]
    if spec.get("name") != HEAD_MODEL:
        raise CheckpointError(f"{folder} holds a {spec.get('name')!r} model, not a face embedding head")
    weights = load_weights(folder) if weights is None else weights
    arrays = {key: value.numpy() for key, value in weights.items() if not key.startswith(EMBEDDER_PREFIX)}
    return create_head(spec["head"], **spec.get("params", {})).restore(manifest["labels"], arrays)


def _logit_layer(weights: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A K-row logit layer from scikit-learn's: for two classes it has one row z, which becomes (-z/2, z/2).

    softmax(-z/2, z/2) is sigmoid(z), so binary probabilities equal scikit-learn's own.
    """
    weights = np.asarray(weights, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64).reshape(-1)
    if weights.shape[0] == 1:
        return np.vstack([-weights, weights]) / 2.0, np.concatenate([-bias, bias]) / 2.0
    return weights, bias


def _as_module(arrays: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """The arrays as buffers of an empty module: the form the checkpoint writer takes."""
    module = torch.nn.Module()
    for name, value in arrays.items():
        module.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))
    return module
