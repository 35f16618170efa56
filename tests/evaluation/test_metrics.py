"""Every number of medlens.evaluation.metrics against scikit-learn, on random and edge-case data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import METRICS_JSON_KEYS
from scipy.special import expit, softmax
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    roc_auc_score,
    top_k_accuracy_score,
)

from medlens.evaluation import metrics as M


def multilabel_data(rng: np.random.Generator, n: int = 400, k: int = 5, unknown: float = 0.15):
    """Labels with some signal in the scores and a share of NaN (unknown) entries."""
    y = (rng.random((n, k)) < 0.3).astype(float)
    p = expit(1.5 * (2 * y - 1) + rng.normal(size=(n, k)))
    y[rng.random((n, k)) < unknown] = np.nan
    return y, p


def multiclass_data(rng: np.random.Generator, n: int = 500, k: int = 6):
    classes = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), classes] += 1.5
    return np.eye(k)[classes], softmax(logits, axis=1), classes


def names(k: int) -> list[str]:
    return [f"finding_{j}" for j in range(k)]


def column_auc(y: np.ndarray, p: np.ndarray, j: int = 0) -> float | None:
    """A reference metric for the generic bootstrap: sklearn's AUC of column j on its known rows."""
    known = np.isfinite(y[:, j])
    target = y[known, j]
    return roc_auc_score(target, p[known, j]) if 0 < target.sum() < len(target) else None


# ---------------------------------------------------------------------------------------------- multi-label


def test_multilabel_auc_and_ap_match_sklearn_on_known_rows():
    y, p = multilabel_data(np.random.default_rng(0))
    out = M.multilabel_metrics(y, p, names(5))
    for j, name in enumerate(names(5)):
        known = ~np.isnan(y[:, j])
        assert out["auc"][name] == pytest.approx(roc_auc_score(y[known, j], p[known, j]))
        assert out["ap"][name] == pytest.approx(average_precision_score(y[known, j], p[known, j]))
        assert out["per_class"][name]["n_known"] == known.sum()
    aucs = list(out["auc"].values())
    assert out["auc_summary"] == pytest.approx(
        {"min": min(aucs), "max": max(aucs), "mean": np.mean(aucs), "median": np.median(aucs)}
    )
    assert out["macro_auc"] == pytest.approx(np.mean(aucs))


def test_nan_entries_are_ignored_not_counted_as_negatives():
    y, p = multilabel_data(np.random.default_rng(1))
    out = M.multilabel_metrics(y, p, names(5))
    # Whatever an unknown entry's score, the numbers cannot move.
    p_changed = np.where(np.isnan(y), 1 - p, p)
    assert M.multilabel_metrics(y, p_changed, names(5)) == out


def test_labels_without_both_classes_are_none_never_0_or_1():
    rng = np.random.default_rng(2)
    y, p = multilabel_data(rng, n=100, k=4, unknown=0.0)
    y[:, 1] = 0  # no positive
    y[:, 2] = np.where(rng.random(100) < 0.5, 1, np.nan)  # positives and unknowns, no known negative
    y[:, 3] = np.nan  # nothing known
    out = M.multilabel_metrics(y, p, names(4))
    assert out["auc"]["finding_0"] is not None
    for name in names(4)[1:]:
        assert out["auc"][name] is None
        assert out["ap"][name] is None
    assert out["auc_summary"]["min"] == out["auc_summary"]["max"] == out["auc"]["finding_0"]
    assert out["per_class"]["finding_1"]["sensitivity"] is None  # no positives: tp + fn == 0
    assert out["per_class"]["finding_3"]["n_known"] == 0

    nothing = M.multilabel_metrics(y[:, 1:], p[:, 1:], names(3))
    assert nothing["auc_summary"] == {"min": None, "max": None, "mean": None, "median": None}
    assert nothing["macro_auc"] is None


def test_operating_point_matches_sklearn_confusion_matrix():
    y, p = multilabel_data(np.random.default_rng(3))
    thresholds = [0.2, 0.5, 0.7, None, 0.9]
    out = M.multilabel_metrics(y, p, names(5), thresholds=thresholds)
    for j, name in enumerate(names(5)):
        known = ~np.isnan(y[:, j])
        t = 0.5 if thresholds[j] is None else thresholds[j]
        tn, fp, fn, tp = confusion_matrix(y[known, j], p[known, j] >= t, labels=[0, 1]).ravel()
        point = out["per_class"][name]
        assert point["threshold"] == t
        assert point["confusion"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
        assert point["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert point["specificity"] == pytest.approx(tn / (tn + fp))
        assert point["ppv"] == pytest.approx(tp / (tp + fp))
        assert point["npv"] == pytest.approx(tn / (tn + fn))
        assert point["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_zero_denominators_give_none():
    y = np.array([[1.0], [0.0], [0.0]])
    p = np.array([[0.2], [0.3], [0.1]])
    point = M.multilabel_metrics(y, p, ["effusion"], thresholds=[0.9])["per_class"]["effusion"]
    assert point["ppv"] is None  # nothing called positive
    assert point["sensitivity"] == 0.0
    assert point["npv"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------- multi-class


def test_multiclass_numbers_match_sklearn():
    y, p, classes = multiclass_data(np.random.default_rng(4), k=6)
    out = M.multiclass_metrics(y, p, names(6), top_k=(1, 3, 5, 6))
    predicted = p.argmax(axis=1)
    report = classification_report(classes, predicted, labels=range(6), output_dict=True, zero_division=np.nan)
    for c, name in enumerate(names(6)):
        row = out["per_class"][name]
        assert row["precision"] == pytest.approx(report[str(c)]["precision"])
        assert row["recall"] == pytest.approx(report[str(c)]["recall"])
        assert row["f1"] == pytest.approx(report[str(c)]["f1-score"])
        assert row["support"] == report[str(c)]["support"]
        assert out["auc"][name] == pytest.approx(roc_auc_score(classes == c, p[:, c]))
        assert out["ap"][name] == pytest.approx(average_precision_score(classes == c, p[:, c]))
    assert out["macro_avg"]["f1"] == pytest.approx(report["macro avg"]["f1-score"])
    assert out["accuracy"] == pytest.approx(report["accuracy"])
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(classes, predicted))
    counts = confusion_matrix(classes, predicted, labels=range(6))
    assert out["confusion"] == counts.tolist()
    assert np.allclose(out["confusion_normalized"], counts / counts.sum(axis=1, keepdims=True))
    assert set(out["top_k"]) == {"top_1", "top_3", "top_5"}  # k must be below K
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(classes, p, k=k, labels=range(6))
        assert out["top_k"][f"top_{k}"] == pytest.approx(expected)
    assert out["top_k"]["top_1"] == out["accuracy"]
    macro = roc_auc_score(classes, p, multi_class="ovr", average="macro")
    assert out["macro_auc"] == pytest.approx(macro)


def test_multiclass_absent_class_and_unknown_rows():
    y, p, classes = multiclass_data(np.random.default_rng(5), n=300, k=4)
    keep = classes != 2
    y, p, classes = y[keep], p[keep], classes[keep]
    y[:20] = np.nan  # unknown images are skipped everywhere
    out = M.multiclass_metrics(y, p, names(4))
    assert out["n_known"] == len(y) - 20
    assert out["auc"]["finding_2"] is None
    assert out["per_class"]["finding_2"]["support"] == 0
    assert out["per_class"]["finding_2"]["recall"] is None
    assert out["confusion_normalized"][2] == [None] * 4
    assert out["auc"]["finding_0"] == pytest.approx(roc_auc_score(classes[20:] == 0, p[20:, 0]))
    predicted = p[20:].argmax(axis=1)
    with pytest.warns(UserWarning):  # sklearn too leaves out the class nobody has
        expected = balanced_accuracy_score(classes[20:], predicted)
    assert out["balanced_accuracy"] == pytest.approx(expected)
    assert set(out["top_k"]) == {"top_1", "top_3"}

    every_row = M.multiclass_metrics(np.eye(3)[[0, 0, 0]], softmax(np.eye(3)[[0, 1, 2]], axis=1), names(3))
    assert every_row["auc"]["finding_0"] is None


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_seeded_and_reproducible():
    rng = np.random.default_rng(6)
    y, p = multilabel_data(rng, n=200, k=2)
    patients = np.repeat(np.arange(100), 2).astype(str)
    first = M.bootstrap_ci(column_auc, y, p, patients, n_resamples=100, seed=3)
    assert first == M.bootstrap_ci(column_auc, y, p, patients, n_resamples=100, seed=3)
    assert first != M.bootstrap_ci(column_auc, y, p, patients, n_resamples=100, seed=4)
    intervals = M.auc_ci(y, p, patients, n_resamples=100, seed=3)
    assert intervals == M.auc_ci(y, p, patients, n_resamples=100, seed=3)


def test_fast_auc_ci_equals_the_generic_bootstrap_with_sklearn():
    rng = np.random.default_rng(7)
    y, p = multilabel_data(rng, n=300, k=3)
    p = np.round(p, 1)  # plenty of tied scores
    patients = rng.integers(0, 120, 300).astype(str)
    fast = M.auc_ci(y, p, patients, n_resamples=200, seed=11)
    for j in range(3):
        generic = M.bootstrap_ci(lambda yy, pp, j=j: column_auc(yy, pp, j), y, p, patients, n_resamples=200, seed=11)
        assert fast[j] == pytest.approx(generic)


def test_bootstrap_draws_whole_patients():
    # Two images per patient; the score column names the patient, so each resample shows who came along.
    n_patients = 40
    patient_of_image = np.repeat(np.arange(n_patients), 2)
    y = np.repeat((np.arange(n_patients) % 2).astype(float), 2)[:, None]
    p = patient_of_image.astype(float)[:, None]
    drawn_counts = []

    def record(yy: np.ndarray, pp: np.ndarray) -> float:
        drawn_counts.append(np.bincount(pp[:, 0].astype(int), minlength=n_patients))
        return float(yy.mean())

    M.bootstrap_ci(record, y, p, patient_of_image.astype(str), n_resamples=50, seed=0)
    counts = np.array(drawn_counts)
    assert counts.shape == (50, n_patients)
    assert (counts % 2 == 0).all()  # both images of a drawn patient, every time
    assert (counts.sum(axis=1) == 2 * n_patients).all()  # n_patients patients drawn per resample
    assert (counts == 0).any()  # with replacement: someone is left out


def test_ci_contains_the_point_estimate_and_narrows_with_more_patients():
    rng = np.random.default_rng(8)
    widths = []
    for n_patients in (60, 1200):
        y, p = multilabel_data(rng, n=2 * n_patients, k=1, unknown=0.0)
        patients = np.repeat(np.arange(n_patients), 2).astype(str)
        lo, hi = M.auc_ci(y, p, patients, n_resamples=300, seed=0)[0]
        assert lo < roc_auc_score(y[:, 0], p[:, 0]) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_undefined_metric_gives_none():
    y = np.zeros((50, 2))
    y[0, 1] = 1  # one positive image: most resamples miss it
    p = np.random.default_rng(9).random((50, 2))
    patients = np.arange(50).astype(str)
    intervals = M.auc_ci(y, p, patients, n_resamples=200)
    assert intervals[0] is None  # never defined
    assert intervals[1] is None or intervals[1][0] <= intervals[1][1]
    assert M.auc_ci(y, p, patients, n_resamples=200, min_defined=0.9)[1] is None
    assert M.bootstrap_ci(lambda yy, pp: None, y, p, patients, n_resamples=20) is None


# ---------------------------------------------------------------------------------------------- calibration


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(10)
    p = rng.random((4000, 3))
    y = (rng.random((4000, 3)) < p).astype(float)
    y[rng.random(y.shape) < 0.1] = np.nan
    assert M.expected_calibration_error(y, p, "multilabel") < 0.03
    overconfident = np.where(p > 0.5, 0.99, 0.01)
    assert M.expected_calibration_error(y, overconfident, "multilabel") > 0.1

    logits = 2 * rng.normal(size=(6000, 5))
    classes = np.array([rng.choice(5, p=row) for row in softmax(logits, axis=1)])
    y = np.eye(5)[classes]
    assert M.expected_calibration_error(y, softmax(logits, axis=1), "multiclass") < 0.03
    assert M.expected_calibration_error(y, softmax(3 * logits, axis=1), "multiclass") > 0.1


def test_reliability_curve_bins():
    y = np.array([[1.0], [0.0], [1.0], [np.nan], [1.0]])
    p = np.array([[0.05], [0.15], [0.95], [0.5], [1.0]])
    curve = M.reliability_curve(y, p, "multilabel", n_bins=10)
    assert np.allclose(curve.centres, np.arange(0.05, 1.0, 0.1))
    assert curve.counts.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]  # the NaN pair is skipped; 1.0 is last
    assert curve.accuracy[0] == 1.0 and curve.accuracy[1] == 0.0 and np.isnan(curve.accuracy[5])
    assert curve.confidence[9] == pytest.approx(0.975)
    assert curve.ece == pytest.approx((0.95 + 0.15 + 2 * 0.025) / 4)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_temperature_recovers_the_scale_and_lowers_ece(task):
    rng = np.random.default_rng(11)
    logits = 1.5 * rng.normal(size=(5000, 4))
    if task == "multilabel":
        y = (rng.random(logits.shape) < expit(logits)).astype(float)
        y[rng.random(y.shape) < 0.1] = np.nan
    else:
        y = np.eye(4)[[rng.choice(4, p=row) for row in softmax(logits, axis=1)]]
    temperature = M.fit_temperature(3 * logits, y, task)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = M.expected_calibration_error(y, M.apply_temperature(3 * logits, 1.0, task), task)
    after = M.expected_calibration_error(y, M.apply_temperature(3 * logits, temperature, task), task)
    assert after < before / 2


def test_apply_temperature_is_sigmoid_or_softmax():
    logits = np.random.default_rng(12).normal(size=(10, 3))
    assert np.allclose(M.apply_temperature(logits, 2.0, "multilabel"), expit(logits / 2))
    assert np.allclose(M.apply_temperature(logits, 2.0, "multiclass"), softmax(logits / 2, axis=1))
    with pytest.raises(ValueError, match="multiclass"):
        M.apply_temperature(logits, 1.0, "binary")


# ---------------------------------------------------------------------------------------------- thresholds


def brute_force_threshold(y: np.ndarray, p: np.ndarray, method: str, target: float = 0.9) -> float:
    """Try every score as a threshold, highest first."""
    known = ~np.isnan(y)
    y, p = y[known], p[known]
    best, best_value = None, -np.inf
    for t in np.sort(np.unique(p))[::-1]:
        sensitivity = ((p >= t) & (y == 1)).sum() / (y == 1).sum()
        specificity = ((p < t) & (y == 0)).sum() / (y == 0).sum()
        if method == "sensitivity" and sensitivity >= target:
            return t
        if method == "youden" and sensitivity + specificity - 1 > best_value:
            best, best_value = t, sensitivity + specificity - 1
    return best


@pytest.mark.parametrize("method", ["youden", "sensitivity"])
def test_thresholds_match_brute_force(method):
    y, p = multilabel_data(np.random.default_rng(13), n=300, k=4)
    p[:, 1] = np.round(p[:, 1], 1)
    chosen = M.choose_thresholds(y, p, method=method, target_sensitivity=0.8)
    for j in range(4):
        assert chosen[j] == pytest.approx(brute_force_threshold(y[:, j], p[:, j], method, 0.8))


def test_thresholds_undefined_label_and_bad_method():
    y = np.array([[0.0, 1.0], [0.0, 0.0], [np.nan, 1.0]])
    p = np.array([[0.1, 0.8], [0.2, 0.3], [0.3, 0.6]])
    assert M.choose_thresholds(y, p) == [None, 0.6]
    with pytest.raises(ValueError, match="youden"):
        M.choose_thresholds(y, p, method="f1")


# ---------------------------------------------------------------------------------------------- subgroups


def test_subgroups_split_by_value_and_age_band():
    rng = np.random.default_rng(14)
    y, p = multilabel_data(rng, n=120, k=3)
    frame = pd.DataFrame(
        {
            "sex": np.where(np.arange(120) < 70, "F", "M"),
            "age": np.r_[np.full(50, 45), np.full(60, 85), np.full(7, 19.5), [20, np.nan, 250]],
            "view": np.r_[["PA"] * 116, ["AP"] * 3, [None]],
        },
        index=np.arange(1000, 1120),  # the frame's own index must not matter
    )
    out = M.subgroup_metrics(frame, ["sex", "age", "view", "source"], "multilabel", y, p, names(3))
    assert set(out) == {"sex", "age", "view"}  # an absent column is skipped
    assert {v: g["n_images"] for v, g in out["sex"].items()} == {"F": 70, "M": 50}
    ages = {v: g["n_images"] for v, g in out["age"].items()}
    assert list(ages.items()) == [("0-19", 7), ("20-39", 1), ("40-59", 50), ("80+", 60)]  # in band order
    assert out["age"]["20-39"]["metrics"] is None  # under the minimum size
    assert out["view"]["AP"] == {"n_images": 3, "metrics": None}
    assert out["view"]["PA"]["n_images"] == 116
    women = M.multilabel_metrics(y[:70], p[:70], names(3))
    assert out["sex"]["F"]["metrics"]["auc"] == women["auc"]
    sensitivity = out["sex"]["F"]["metrics"]["sensitivity"]["finding_1"]
    assert sensitivity == women["per_class"]["finding_1"]["sensitivity"]


def test_multiclass_subgroups():
    y, p, classes = multiclass_data(np.random.default_rng(15), n=100, k=4)
    frame = pd.DataFrame({"source": np.where(np.arange(100) % 2 == 0, "a", "b")})
    out = M.subgroup_metrics(frame, ["source"], "multiclass", y, p, names(4))
    even = slice(0, None, 2)
    assert out["source"]["a"]["metrics"]["accuracy"] == pytest.approx((p[even].argmax(1) == classes[even]).mean())
    with pytest.raises(ValueError, match="one row per image"):
        M.subgroup_metrics(frame.iloc[:10], ["source"], "multiclass", y, p, names(4))


# ---------------------------------------------------------------------------------------------- metrics.json


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_evaluate_predictions_is_json_with_every_key(task):
    rng = np.random.default_rng(16)
    if task == "multilabel":
        y, p = multilabel_data(rng, n=200, k=4)
        y[:, 3] = 0  # an undefined label must come out as null, not NaN
    else:
        y, p, _ = multiclass_data(rng, n=200, k=4)
    patients = rng.integers(0, 80, 200).astype(str)
    frame = pd.DataFrame({"sex": rng.choice(["F", "M"], 200), "age": rng.integers(1, 95, 200)})
    out = M.evaluate_predictions(
        task, y, p, names(4), patients, n_resamples=100, frame=frame, subgroup_columns=["sex", "age"]
    )
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out
    assert set(out) >= METRICS_JSON_KEYS
    assert out["n_images"] == 200 and out["n_patients"] == len(set(patients))
    assert out["n_resamples"] == 100
    assert set(out["subgroups"]) == {"sex", "age"}
    lo, hi = out["auc_ci"]["finding_0"]
    assert lo <= out["auc"]["finding_0"] <= hi
    if task == "multilabel":
        assert out["auc"]["finding_3"] is None and out["auc_ci"]["finding_3"] is None
        assert out["accuracy"] is None and out["top_k"] is None
        assert out["thresholds"] == dict.fromkeys(names(4), 0.5)
        assert "sensitivity" in out["per_class"]["finding_0"]
    else:
        assert out["accuracy"] is not None and set(out["top_k"]) == {"top_1", "top_3"}
        assert len(out["confusion"]) == 4 and len(out["confusion_normalized"][0]) == 4
        assert set(out["per_class"]["finding_0"]) == {"precision", "recall", "f1", "support"}


def test_to_jsonable_and_input_checks():
    value = {1: np.float32(0.5), "b": [np.nan, np.int64(3)], "c": (np.array([1.0, np.inf]),)}
    assert M.to_jsonable(value) == {"1": 0.5, "b": [None, 3], "c": [[1.0, None]]}
    with pytest.raises(ValueError, match="N x K"):
        M.multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 3)), names(2))
    with pytest.raises(ValueError, match="label names"):
        M.multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 2)), names(3))
    with pytest.raises(ValueError, match="one entry per image"):
        M.auc_ci(np.zeros((3, 1)), np.zeros((3, 1)), ["a", "b"])


def test_multilabel_auc_summary_averages_only_labels_with_enough_positives():
    rng = np.random.default_rng(7)
    y, p = multilabel_data(rng, n=120, k=3, unknown=0.0)
    y[:, 2] = 0
    y[:4, 2] = 1  # 4 positives: an AUC, but below MIN_POSITIVES
    out = M.multilabel_metrics(y, p, names(3))
    assert out["auc"]["finding_2"] is not None
    over = {"min_positives": M.MIN_POSITIVES, "labels": names(3)[:2], "excluded": ["finding_2"]}
    assert out["auc_summary_over"] == over
    assert out["auc_summary"]["mean"] == pytest.approx(np.mean([out["auc"][n] for n in names(3)[:2]]))
    assert out["macro_auc"] == pytest.approx(np.mean(list(out["auc"].values())))  # every defined AUC, as before
    loose = M.multilabel_metrics(y, p, names(3), min_positives=4)
    assert loose["auc_summary_over"]["excluded"] == [] and loose["auc_summary"]["max"] >= out["auc_summary"]["max"]
