"""Patient-grouped, label-stratified splits; undersampling; class and positive weights.

Every split here groups by ``patient_id``: NIH follow-up images of one patient never straddle train and
test. :func:`check_no_leakage` fails loudly if they ever do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medlens.data.records import NO_FINDING, RecordTable
from medlens.errors import ConfigError, LeakageError
from medlens.io import write_atomic

Splits = dict[str, np.ndarray]

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.05, "test": 0.15}


def patient_split(
    table: RecordTable, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> Splits:
    """Row positions per split, grouped by patient and stratified by each patient's rarest label.

    Within each stratum patients are shuffled and laid end to end by image count; each patient goes to the
    split its midpoint falls in, so split sizes follow ``fractions`` in images, not patients.
    """
    names = list(fractions)
    shares = np.array([fractions[n] for n in names], dtype=np.float64)
    if np.any(shares < 0) or not np.isclose(shares.sum(), 1.0):
        raise ConfigError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    position = _patient_positions(table, seed)
    edges = np.cumsum(shares)[:-1]
    which = np.searchsorted(edges, position, side="right")
    splits = {name: np.flatnonzero(which == i) for i, name in enumerate(names)}
    check_no_leakage(table, splits)
    return splits


def patient_folds(table: RecordTable, k: int, seed: int = 0) -> np.ndarray:
    """A fold in ``0..k-1`` per row, patient-grouped and label-stratified like :func:`patient_split`."""
    if k < 2:
        raise ConfigError(f"cross-validation needs --folds of at least 2, got {k}")
    return np.minimum((_patient_positions(table, seed) * k).astype(np.int64), k - 1)


def fold_splits(table: RecordTable, k: int, test_fraction: float = 0.0, seed: int = 0) -> Splits:
    """``fold0`` .. ``fold{k-1}`` over the images outside a held-out ``test`` split (when ``test_fraction`` > 0).

    The test split is carved out first, as :func:`patient_split` would; the folds then cover every other
    image exactly once. Both are patient-grouped and label-stratified.
    """
    rest = np.arange(len(table))
    splits: Splits = {}
    if test_fraction > 0:
        parts = patient_split(table, {"cv": 1.0 - test_fraction, "test": test_fraction}, seed=seed)
        rest, splits["test"] = parts["cv"], parts["test"]
    fold_of = patient_folds(table.subset(rest), k, seed)
    splits = {**{f"fold{i}": rest[fold_of == i] for i in range(k)}, **splits}
    empty = [name for name, rows in splits.items() if len(rows) == 0]
    if empty:
        raise ConfigError(f"{k} folds of {len(rest)} images left {empty} empty: choose fewer folds")
    check_no_leakage(table, splits)
    return splits


def _patient_positions(table: RecordTable, seed: int) -> np.ndarray:
    """Each row's place in [0, 1) along its stratum's shuffled patient line (same for a patient's rows)."""
    frame = pd.DataFrame({"patient": table.patient_ids, "stratum": _row_strata(table)})
    patients = frame.groupby("patient", sort=True).agg(n=("stratum", "size"), stratum=("stratum", "min"))
    rng = np.random.default_rng(seed)
    patients["order"] = rng.permutation(len(patients))
    patients = patients.sort_values(["stratum", "order"])
    end = patients.groupby("stratum")["n"].cumsum()
    total = patients.groupby("stratum")["n"].transform("sum")
    patients["position"] = (end - patients["n"] / 2.0) / total
    return patients["position"].reindex(frame["patient"]).to_numpy()


def _row_strata(table: RecordTable) -> np.ndarray:
    """A stratum per row: its rarest positive label (multi-label), its class, or K for no positive."""
    known = np.nan_to_num(table.labels, nan=0.0) > 0.5
    counts = known.sum(axis=0)
    rarity = np.where(known, counts[None, :], np.iinfo(np.int64).max)
    rarest = np.argmin(rarity, axis=1)
    return np.where(known.any(axis=1), rarest, table.labels.shape[1])


def write_splits(path: str | Path, table: RecordTable, splits: Mapping[str, np.ndarray]) -> None:
    """Keep which image went to which split beside a run (``path, patient_id, split``)."""
    rows = [(table.frame["path"].iat[i], table.patient_ids[i], name) for name, idx in splits.items() for i in idx]
    write_atomic(Path(path), pd.DataFrame(rows, columns=["path", "patient_id", "split"]).to_csv(index=False))


def read_splits(path: str | Path, table: RecordTable) -> Splits:
    """Row positions per split, as :func:`write_splits` kept them, for the rows of ``table`` they name."""
    saved = pd.read_csv(path, dtype=str)
    where = {p: i for i, p in enumerate(table.frame["path"].astype(str))}
    return {
        name: np.array([where[p] for p in group["path"] if p in where], dtype=np.int64)
        for name, group in saved.groupby("split")
    }


def check_no_leakage(table: RecordTable, splits: Mapping[str, Sequence[int] | np.ndarray]) -> None:
    """Raise :class:`LeakageError` naming patients that appear in more than one split."""
    ids = table.patient_ids
    owner: dict[str, str] = {}
    leaked: dict[str, set[str]] = {}
    for name, rows in splits.items():
        for patient in np.unique(ids[np.asarray(rows, dtype=np.int64)]):
            first = owner.setdefault(patient, name)
            if first != name:
                leaked.setdefault(patient, {first}).add(name)
    if leaked:
        shown = ", ".join(f"{p} in {sorted(s)}" for p, s in list(leaked.items())[:5])
        raise LeakageError(f"{len(leaked)} patients are in more than one split: {shown}")


def undersample(
    table: RecordTable, rows: np.ndarray, label: str = NO_FINDING, keep: float = 0.2, seed: int = 0
) -> np.ndarray:
    """Keep a random ``keep`` fraction of the ``rows`` whose label is ``label``; the others all stay.

    For multi-label tables ``"No Finding"`` means rows with no positive and no unknown label; otherwise
    ``label`` must be one of the table's labels.
    """
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"data.undersample_keep must be in (0, 1], got {keep}")
    rows = np.asarray(rows, dtype=np.int64)
    labels = table.labels[rows]
    if label == NO_FINDING and label not in table.label_names:
        majority = np.all(labels == 0.0, axis=1)
    elif label in table.label_names:
        majority = labels[:, table.label_names.index(label)] == 1.0
    else:
        raise ConfigError(f"cannot undersample {label!r}: labels are {table.label_names} (or {NO_FINDING!r})")
    rng = np.random.default_rng(seed)
    drop = majority & (rng.random(len(rows)) >= keep)
    return rows[~drop]


def positive_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label (positive, negative) weights: positives weighted by the negative frequency and vice versa.

    This is the NIH seed's weighting; unknown (NaN) entries are ignored. A label with no known entries
    gets weights of 0.5 each.
    """
    known = ~np.isnan(labels)
    n = known.sum(axis=0).astype(np.float64)
    pos = np.nansum(labels, axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        pos_freq = np.where(n > 0, pos / n, 0.5)
    return (1.0 - pos_freq).astype(np.float32), pos_freq.astype(np.float32)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse-frequency class weights for a one-hot matrix, scaled so their mean over classes is 1."""
    counts = np.nansum(labels, axis=0).astype(np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)
