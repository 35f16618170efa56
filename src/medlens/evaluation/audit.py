"""The numbers of a shortcut audit: does a model score by recognising where an image came from?

Four checks, each a function of scores and tables (no model here; ``medlens.jobs.audit`` runs the model):

- :func:`group_performance`: the headline metric (accuracy for multi-class, macro AUC for multi-label) per
  source, site, view, scanner, sex and age band, with the patient-bootstrap CIs of
  :mod:`medlens.evaluation.metrics`; a group is flagged when its whole interval lies below the pooled one.
- :func:`source_probe` and :func:`label_dependence`: how well the source can be told from features (the
  model's embeddings, or downsampled pixels) by a patient-grouped, cross-validated linear probe, beside how
  strongly the label depends on the source in the data (Cramér's V, mutual information).
- :func:`score_change`: how much probabilities, decisions and AUCs move when part of every image is covered.
- :func:`evidence_share`: the share of heatmap energy inside a region (lung fields), beside the region's
  share of the image (what a flat map would give).

:func:`verdicts` turns them into one plain line per check. Thresholds are named constants below; each line
gives the numbers it judged, so a reader can judge them again.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats.contingency import association, crosstab

from medlens.evaluation.metrics import (
    DEFAULT_AGE_BANDS,
    _percentile_interval,
    as_arrays,
    auc_resamples,
    check_task,
    class_indices,
    column_groups,
    multilabel_metrics,
    ranking_targets,
    resample_weights,
    to_jsonable,
)

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("source", "site", "source_repo", "scanner", "view", "sex", "age")
"""Columns whose groups the performance check compares, where the data has them."""
SOURCE_COLUMNS = ("source", "site", "source_repo", "scanner")
"""Columns that name where an image came from, in order of preference."""
SITE = "site"

HIGH_PROBE = 0.5
"""A probe's balanced accuracy is high when it covers this share of the way from chance to 1."""
HIGH_DEPENDENCE = 0.5
"""Cramér's V at or above this: the label depends strongly on the source (Cohen's "large" is 0.5 at 1 df)."""
MAX_FLIP_SHARE = 0.10
MAX_MEAN_CHANGE = 0.05
"""Covering the border or the text moves a model too much past either. AUC changes are reported, not judged:
on a few hundred images a one-vs-rest AUC's standard error (~0.05-0.08) is as large as any limit worth
setting, and a model close to chance reorders near-tied scores on changes of 0.001."""
AUC_HOLDS = 0.10
"""A cover under which no AUC falls by this much leaves the ranking as it was: a flagged border then shifts the
scores without carrying the answers. Wording only, the flag stands: the stamped phantoms' model loses up to
0.60 when its border goes, the demo's 0.04, a cxr4 model 0.12 (docs/audit.md)."""
FLIP_MIN_MOVE = 0.05
"""A decision counts as flipped only when one of the image's probabilities moved this much."""
RIDGE_ALPHA = 10.0
"""The source probe's L2 penalty on standardised features: strong, since there are often more features than images."""
MIN_CONCENTRATION = 1.0
"""Heatmap energy inside the lungs below the lungs' share of the image (ratio < 1): no better than a flat map."""


# ---------------------------------------------------------------------------------------------- groups


def with_site(frame: pd.DataFrame, patient_ids: Sequence[str]) -> pd.DataFrame:
    """``frame`` with a ``site`` column from patient ids written ``site:id`` (cxr4's ``nih:123``), where every
    id is written so and the frame has no ``site`` of its own; otherwise ``frame`` as it is."""
    ids = pd.Series(np.asarray(patient_ids, dtype=str))
    if SITE in frame.columns or len(ids) == 0 or not ids.str.contains(":", regex=False).all():
        return frame
    return frame.assign(site=ids.str.split(":", n=1).str[0].to_numpy())


def headline_metric(task: str) -> str:
    check_task(task)
    return "accuracy" if task == "multiclass" else "macro_auc"


def chance_level(task: str, y: np.ndarray) -> float:
    """What the headline metric gives with no skill: the most frequent class's share (the no-information
    rate) for accuracy, 0.5 for an AUC."""
    if task != "multiclass":
        return 0.5
    classes, known = class_indices(y)
    return float(np.bincount(classes[known]).max() / known.sum()) if known.any() else 1.0


def beats_chance(groups: dict[str, Any] | None) -> bool:
    """Whether the pooled metric's interval lies wholly above chance; True where there is no interval to say."""
    pooled = (groups or {}).get("pooled") or {}
    if not pooled.get("ci") or pooled.get("chance") is None:
        return True
    return bool(pooled["ci"][0] > pooled["chance"])


def _metric_with_resamples(
    task: str, y: np.ndarray, p: np.ndarray, ids: np.ndarray, n_resamples: int, seed: int
) -> tuple[float | None, np.ndarray]:
    """The headline metric on these images and its value on each patient resample (NaN where undefined)."""
    if task == "multiclass":
        classes, known = class_indices(y)
        correct = (p[known].argmax(axis=1) == classes[known]).astype(np.float64)
        if not known.any():
            return None, np.full(n_resamples, np.nan)
        blocks = list(resample_weights(ids[known], int(known.sum()), n_resamples, seed))
        weights = np.concatenate(blocks).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(correct.mean()), (weights @ correct) / weights.sum(axis=1)
    value = multilabel_metrics(y, p, [str(j) for j in range(y.shape[1])])["macro_auc"]
    values, defined = auc_resamples(y, p, ids, n_resamples, seed)
    if not any(defined):
        return None, np.full(n_resamples, np.nan)
    with warnings.catch_warnings():  # a resample may lack every column's positives: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return value, np.nanmean(values[defined], axis=0)


def group_performance(
    task: str,
    y_true: Any,
    y_prob: Any,
    patient_ids: Any,
    frame: pd.DataFrame,
    columns: Sequence[str] = GROUP_COLUMNS,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    min_size: int = 5,
    age_bands: Sequence[float] = DEFAULT_AGE_BANDS,
) -> dict[str, Any]:
    """The headline metric pooled and per group of each column of ``frame`` present, with patient-bootstrap CIs.

    Returns ``metric``, ``pooled`` ({value, ci, n_images, n_patients}), ``columns`` ({column: {group:
    {n_images, n_patients, value, ci, below}}}; groups under ``min_size`` images get value and ci None) and
    ``flagged`` (``"column=group"`` for each group whose interval lies wholly below the pooled one).
    """
    y, p = as_arrays(y_true, y_prob)
    ids = np.asarray(patient_ids).astype(str)
    if len(frame) != len(y):
        raise ValueError(f"frame has {len(frame)} rows for {len(y)} images; it must be one row per image")

    def measured(rows: np.ndarray) -> dict[str, Any]:
        value, resampled = _metric_with_resamples(task, y[rows], p[rows], ids[rows], n_resamples, seed)
        ci = _percentile_interval(resampled, alpha, 0.5) if value is not None else None
        return {"n_images": int(rows.sum()), "n_patients": len(set(ids[rows])), "value": value, "ci": ci}

    pooled = measured(np.ones(len(y), dtype=bool)) | {"chance": chance_level(task, y)}
    result: dict[str, Any] = {}
    flagged = []
    for column in columns:
        if column not in frame.columns:
            continue
        groups = {}
        for group, rows in column_groups(frame, column, age_bands):
            if rows.sum() < min_size:
                groups[group] = {"n_images": int(rows.sum()), "n_patients": len(set(ids[rows])), "value": None,
                                 "ci": None, "below": False}  # fmt: skip
                continue
            found = measured(rows)
            found["below"] = bool(found["ci"] and pooled["ci"] and found["ci"][1] < pooled["ci"][0])
            if found["below"]:
                flagged.append(f"{column}={group}")
            groups[group] = found
        if len(groups) > 1:
            result[column] = groups
    return to_jsonable(
        {"metric": headline_metric(task), "pooled": pooled, "columns": result, "flagged": flagged,
         "ci_level": 1 - alpha, "n_resamples": n_resamples}
    )  # fmt: skip


def source_performance(
    task: str, y_true: Any, y_prob: Any, patient_ids: Any, frame: pd.DataFrame, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """:func:`group_performance` over the source columns alone (what every evaluation reports); None without one."""
    frame = with_site(frame, patient_ids)
    columns = [c for c in SOURCE_COLUMNS if c in frame.columns]
    if not columns:
        return None
    return group_performance(task, y_true, y_prob, patient_ids, frame, columns, n_resamples, seed)


# ---------------------------------------------------------------------------------------------- source


def source_column(frame: pd.DataFrame) -> str | None:
    """The first column of :data:`SOURCE_COLUMNS` with at least two values, or None."""
    for column in SOURCE_COLUMNS:
        if column in frame.columns and frame[column].dropna().nunique() > 1:
            return column
    return None


def _label_codes(y: np.ndarray, task: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, codes, known rows) per label variable: the class (multi-class), or each label (multi-label)."""
    if task == "multiclass":
        classes, known = class_indices(y)
        return [("class", classes, known)]
    return [(str(j), np.nan_to_num(y[:, j]).astype(int), np.isfinite(y[:, j])) for j in range(y.shape[1])]


def label_dependence(
    y_true: Any, sources: Sequence[Any], task: str, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """How strongly the label depends on the source in the data: Cramér's V and mutual information (bits).

    Multi-class: the class against the source. Multi-label: each label against the source, and the
    strongest one reported. Rows with no source or an unknown label are left out.
    """
    y = np.asarray(y_true, dtype=np.float64)
    source = pd.Series(list(sources), dtype=object)
    has_source = source.notna().to_numpy()
    best: dict[str, Any] = {"cramers_v": None, "mutual_information_bits": None, "label": None}
    for name, codes, known in _label_codes(y, task):
        rows = known & has_source
        if rows.sum() < 2:
            continue
        _, table = crosstab(source[rows].astype(str).to_numpy(), codes[rows])
        if min(table.shape) < 2:
            v, mi = 0.0, 0.0
        else:
            v, mi = float(association(table, method="cramer")), _mutual_information(table)
        if best["cramers_v"] is None or v > best["cramers_v"]:
            shown = name if task == "multiclass" or label_names is None else label_names[int(name)]
            best = {"cramers_v": v, "mutual_information_bits": mi, "label": shown}
    return best


def _mutual_information(table: np.ndarray) -> float:
    joint = table / table.sum()
    outer = joint.sum(axis=1, keepdims=True) @ joint.sum(axis=0, keepdims=True)
    inside = joint > 0
    return float((joint[inside] * np.log2(joint[inside] / outer[inside])).sum())


def source_probe(
    features: np.ndarray, sources: Sequence[Any], patient_ids: Sequence[str], n_folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Balanced accuracy of a linear probe that tells the source from ``features``, cross-validated by patient.

    A standardised ridge classifier (one-vs-rest least squares, classes balanced) in a stratified,
    patient-grouped K-fold: linear, closed-form, so it costs milliseconds on a few hundred images; sources
    with fewer than two patients are left out (a patient-grouped fold can never see them in training).
    Returns ``balanced_accuracy`` (None when fewer than two sources remain), ``chance`` (1 / sources),
    ``n_images``, ``n_sources``, ``left_out_sources`` and ``folds``.
    """
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    source = pd.Series(list(sources), dtype=object)
    ids = pd.Series(np.asarray(patient_ids, dtype=str))
    usable = source.notna() & pd.Series(np.isfinite(x).all(axis=1))
    patients_per_source = ids[usable].groupby(source[usable].astype(str)).nunique()
    kept = sorted(patients_per_source.index[patients_per_source >= 2])
    rows = (usable & source.astype(str).isin(kept)).to_numpy()
    empty = {"balanced_accuracy": None, "chance": None, "n_images": int(rows.sum()), "n_sources": len(kept),
             "left_out_sources": sorted(set(patients_per_source.index) - set(kept)), "folds": 0}  # fmt: skip
    if len(kept) < 2:
        return empty
    target = source[rows].astype(str).to_numpy()
    groups = ids[rows].to_numpy()
    folds = int(min(n_folds, patients_per_source[kept].min(), len(set(groups))))
    folds = max(folds, 2)
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=RIDGE_ALPHA, class_weight="balanced"))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(probe, x[rows], target, groups=groups, cv=splitter)
    return {**empty, "balanced_accuracy": float(balanced_accuracy_score(target, predicted)),
            "chance": 1.0 / len(kept), "folds": folds}  # fmt: skip


def is_high(probe: dict[str, Any]) -> bool:
    """Whether a probe's balanced accuracy covers :data:`HIGH_PROBE` of the way from chance to 1."""
    accuracy, chance = probe.get("balanced_accuracy"), probe.get("chance")
    return accuracy is not None and accuracy >= chance + HIGH_PROBE * (1 - chance)


# ---------------------------------------------------------------------------------------------- covering


def _decisions(task: str, probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    if task == "multiclass":
        return probs.argmax(axis=1)[:, None]
    return probs >= np.asarray(thresholds)


def score_change(
    task: str,
    y_true: Any,
    before: Any,
    after: Any,
    label_names: Sequence[str],
    thresholds: Sequence[float],
) -> dict[str, Any]:
    """What covering part of each image did to the scores.

    ``mean_abs_change``: |after - before| averaged over images and labels; ``flip_share``: the share of
    images whose decision changed (the top class, or any label's call at its threshold) while a probability
    moved by at least :data:`FLIP_MIN_MOVE`;
    ``auc_before``/``auc_after``/``auc_change`` per label (one-vs-rest for multi-class; None where
    undefined); ``max_auc_drop`` (0 when no AUC fell); ``per_image``: each image's largest change.
    """
    y, p0 = as_arrays(y_true, before, label_names)
    _, p1 = as_arrays(y_true, after, label_names)
    moved = np.abs(p1 - p0)
    # A decision that changes on a move under FLIP_MIN_MOVE is a near-tie breaking, not the cover's doing.
    changed = (_decisions(task, p0, thresholds) != _decisions(task, p1, thresholds)).any(axis=1)
    flips = changed & (moved.max(axis=1, initial=0.0) >= FLIP_MIN_MOVE)
    names = list(label_names)
    targets = ranking_targets(y, task)
    auc0 = multilabel_metrics(targets, p0, names)["auc"]
    auc1 = multilabel_metrics(targets, p1, names)["auc"]
    change = {n: None if auc0[n] is None or auc1[n] is None else auc1[n] - auc0[n] for n in names}
    drops = [-c for c in change.values() if c is not None]
    return to_jsonable(
        {
            "n_images": len(y),
            "mean_abs_change": float(moved.mean()) if len(y) else None,
            "flip_share": float(flips.mean()) if len(y) else None,
            "auc_before": auc0,
            "auc_after": auc1,
            "auc_change": change,
            "max_auc_drop": max([0.0, *drops]),
            "per_image": moved.max(axis=1) if len(y) else [],
        }
    )


def moves_too_much(change: dict[str, Any]) -> bool:
    """Whether a :func:`score_change` passes any of the limits a lung-reading model stays under."""
    return bool((change["flip_share"] or 0) >= MAX_FLIP_SHARE or (change["mean_abs_change"] or 0) >= MAX_MEAN_CHANGE)


# ---------------------------------------------------------------------------------------------- evidence


def evidence_share(energies: Sequence[float], areas: Sequence[float]) -> dict[str, Any]:
    """Mean share of heatmap energy inside the region, the region's mean share of the image, and their ratio
    (``concentration``: 1 is what a flat map gives, higher is evidence gathered inside)."""
    if not len(energies):
        return {"n_images": 0, "energy_inside": None, "area_share": None, "concentration": None}
    energy, area = float(np.mean(energies)), float(np.mean(areas))
    return {"n_images": len(energies), "energy_inside": energy, "area_share": area,
            "concentration": energy / area if area > 0 else None}  # fmt: skip


# ---------------------------------------------------------------------------------------------- verdicts


def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "undefined" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _cover_verdict(check: str, change: dict[str, Any], finding: str, numbers: str) -> dict[str, Any]:
    """The line of a covering check: flagged when covering moved the model too much."""
    flagged = moves_too_much(change)
    return {"check": check, "flagged": flagged, "line": (f"FLAG: {finding}: " if flagged else "ok: ") + numbers}


def verdicts(audit: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per check, ``{"check", "flagged", "line"}``, from the numbers in ``audit`` (audit.json)."""
    lines = []
    groups = audit.get("groups")
    if groups is not None:
        pooled = groups["pooled"]
        if groups["flagged"]:
            worst = [
                f"{column} {name} {_num(g['value'])} [{_num(g['ci'][0])}, {_num(g['ci'][1])}]"
                for column, found in groups["columns"].items()
                for name, g in found.items()
                if g["below"]
            ]
            line = (f"FLAG: {', '.join(worst)} lie wholly below the pooled {groups['metric']} {_num(pooled['value'])} "
                    f"[{_num((pooled['ci'] or [None])[0])}, {_num((pooled['ci'] or [None, None])[1])}]: "
                    "the model does worse on these groups than its overall figure says")  # fmt: skip
        elif not groups["columns"]:
            line = "no group column (source, site, view, scanner, sex, age) with two groups of 5 images: not checked"
        else:
            line = (f"ok: no group's {groups['metric']} interval lies wholly below the pooled "
                    f"{_num(pooled['value'])} ({', '.join(groups['columns'])})")  # fmt: skip
        lines.append({"check": "groups", "flagged": bool(groups["flagged"]), "line": line})
    source = audit.get("source")
    if source is not None:
        if source.get("column") is None:
            lines.append({"check": "source", "flagged": False,
                          "line": "no source column (source, site, source_repo, scanner): not checked"})  # fmt: skip
        else:
            model, pixels, dependence = source["from_embeddings"], source["from_pixels"], source["label_dependence"]
            recognisable = is_high(model) or is_high(pixels)
            entangled = (dependence["cramers_v"] or 0) >= HIGH_DEPENDENCE
            numbers = (f"{source['column']} told apart with balanced accuracy {_num(model['balanced_accuracy'])} "
                       f"from the model's embeddings and {_num(pixels['balanced_accuracy'])} from the pixels alone "
                       f"(chance {_num(model['chance'])}); label vs {source['column']}: Cramér's V "
                       f"{_num(dependence['cramers_v'])}")  # fmt: skip
            if recognisable and entangled:
                line = ("FLAG: the model can score well by recognising the source, not the disease: " + numbers)
            elif recognisable:
                line = "ok, but the source is recognisable; the label barely depends on it here: " + numbers
            else:
                line = "ok: " + numbers
            lines.append({"check": "source", "flagged": recognisable and entangled, "line": line})
    border = audit.get("border")
    if border:
        worst = max(border["covers"], key=lambda c: (moves_too_much(c), c["flip_share"], c["mean_abs_change"]))
        numbers = (f"covering the outer {worst['width_share']:.0%} ({worst['mode']}) flips {_pct(worst['flip_share'])} "
                   f"of decisions, moves probabilities by {_num(worst['mean_abs_change'])} on average and changes an "
                   f"AUC by up to -{_num(worst['max_auc_drop'])} ({worst['n_images']} images)")  # fmt: skip
        if max(c["max_auc_drop"] for c in border["covers"]) < AUC_HOLDS:
            finding = ("the model's scores depend on the image's border, though its AUCs hold (check its "
                       "thresholds on films framed otherwise)")  # fmt: skip
        else:
            finding = "the model reads its answers off the image's border"
        lines.append(_cover_verdict("border", worst, finding, numbers))
    text = audit.get("text")
    if text is not None:
        if not text["n_with_text"]:
            line = "no burned-in text or marker found: not checked"
            lines.append({"check": "text", "flagged": False, "line": line})
        else:
            change = text["change"]
            numbers = (f"covering the text found on {text['n_with_text']} of {text['n_images']} images flips "
                       f"{_pct(change['flip_share'])} of their decisions and moves probabilities by "
                       f"{_num(change['mean_abs_change'])} on average")  # fmt: skip
            lines.append(_cover_verdict("text", change, "the model reads burned-in text or markers", numbers))
    evidence = audit.get("evidence")
    if evidence is not None and evidence.get("concentration") is not None:
        numbers = (f"{_pct(evidence['energy_inside'])} of the heatmap energy lies inside the {evidence['region']}, "
                   f"which covers {_pct(evidence['area_share'])} of the image ({evidence['n_images']} images)")
        if not beats_chance(groups):
            pooled = groups["pooled"]
            line = (f"not judged: the model's {groups['metric']} {_num(pooled['value'])} [{_num(pooled['ci'][0])}, "
                    f"{_num(pooled['ci'][1])}] does not beat chance ({_num(pooled['chance'])}), so its heatmaps "
                    f"show no learned evidence to place: {numbers}")  # fmt: skip
            lines.append({"check": "evidence", "flagged": False, "line": line})
        else:
            flagged = evidence["concentration"] < MIN_CONCENTRATION
            flag = "FLAG: no more of the evidence lies there than a flat map would put there: "
            line = (flag if flagged else "ok: ") + numbers
            lines.append({"check": "evidence", "flagged": flagged, "line": line})
    return lines
