"""The pixel baseline: logistic regression on 32 x 32 pixels, and how it is laid beside a model."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.evaluation.baseline import PixelBaseline, baseline_aucs, baseline_sentence, compare_with_model
from medlens.evaluation.metrics import evaluate_predictions
from medlens.reports.evaluation import ReportInputs, render_report


def _images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose top-left corner is brighter where a 'finding' is present (learnable from pixels)."""
    present = rng.random(n) < 0.4
    images = rng.integers(0, 200, (n, 32, 32)).astype(np.float64)
    images[present, :8, :8] += 55
    return images.astype(np.uint8), present


def test_multilabel_baseline_learns_known_rows_and_skips_a_label_it_cannot_fit():
    rng = np.random.default_rng(0)
    images, present = _images(rng, 240)
    labels = np.stack([present.astype(float), rng.random(240) < 0.3, np.zeros(240)], axis=1)
    labels[rng.random(240) < 0.2, 0] = np.nan  # unknown: neither positive nor negative
    baseline = PixelBaseline("multilabel").fit(images[:160], labels[:160])
    aucs = baseline_aucs(baseline, images[160:], labels[160:])
    assert aucs[0] > 0.9 and 0.2 < aucs[1] < 0.8  # the bright corner is learnt; noise is not
    assert aucs[2] is None and baseline.fitted_labels.tolist() == [True, True, False]  # no positive to learn from
    assert np.isnan(baseline.predict_proba(images[:3])[:, 2]).all()


def test_multiclass_baseline_is_one_multinomial_model():
    rng = np.random.default_rng(1)
    images, present = _images(rng, 200)
    labels = np.eye(2)[present.astype(int)]
    baseline = PixelBaseline("multiclass").fit(images[:140], labels[:140])
    probs = baseline.predict_proba(images[140:])
    assert probs.shape == (60, 2) and np.allclose(probs.sum(axis=1), 1)
    assert min(baseline_aucs(baseline, images[140:], labels[140:])) > 0.9


def _metrics(rng: np.random.Generator) -> dict:
    """A multi-label evaluation: two labels with signal, one with only 3 positives (out of the AUC summary)."""
    n = 120
    y = np.zeros((n, 3))
    y[:, :2] = rng.random((n, 2)) < 0.4
    y[:3, 2] = 1
    p = np.clip(0.2 * y + 0.8 * rng.random((n, 3)), 0, 1)
    patients = np.array([f"P{i}" for i in range(n)])
    return evaluate_predictions("multilabel", y, p, ["Effusion", "Mass", "Hernia"], patients, n_resamples=20)


def test_a_model_worse_than_the_baseline_is_told_so_per_label_and_overall():
    metrics = _metrics(np.random.default_rng(2))
    assert metrics["auc_summary_over"]["excluded"] == ["Hernia"]
    better = [metrics["auc"]["Effusion"] - 0.05, 0.99, 0.99]  # the model wins one label, loses one
    found = compare_with_model(metrics, better, n_train=80)
    assert found["scored"] == ["Effusion", "Mass", "Hernia"] and found["labels_compared"] == ["Effusion", "Mass"]
    assert found["model_better"] == {"Effusion": True, "Mass": False, "Hernia": False}
    assert found["model_better_overall"] is False
    assert found["mean_auc"] == pytest.approx(np.mean(better[:2]))
    sentence = baseline_sentence(found)
    assert "does NOT beat the pixel baseline" in sentence and "better on 2 (Mass, Hernia)" in sentence
    metrics["baseline"] = found
    page = render_report(metrics, ReportInputs(manifest={"model": {"name": "tiny"}}))
    assert "Pixel baseline" in page and "model does not beat it" in page and "does NOT beat" in page


def test_a_better_model_and_an_omitted_baseline_are_one_sentence_each():
    metrics = _metrics(np.random.default_rng(3))
    worse = compare_with_model(metrics, [0.5, 0.5, None], n_train=80)
    assert worse["model_better_overall"] is True and worse["model_better"]["Hernia"] is None
    assert baseline_sentence(worse).startswith("The model beats the pixel baseline: mean AUC ")
    omitted = {"omitted": "the training images (/gone) are not on this machine"}
    assert baseline_sentence(omitted) == "No pixel baseline: the training images (/gone) are not on this machine."
    page = render_report({**metrics, "baseline": omitted}, ReportInputs(manifest={}))
    assert "No pixel baseline: the training images (/gone) are not on this machine." in page
