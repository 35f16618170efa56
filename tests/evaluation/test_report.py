"""Curves, plots and report.html from synthetic numbers; ``medlens evaluate`` end to end on phantoms and
real data; the report rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CHROMIUM_FLAGS, METRICS_JSON_KEYS, short_real_run, tiny_run
from PIL import Image
from sklearn.metrics import roc_auc_score

from medlens.cli import main
from medlens.errors import DataSourceError
from medlens.evaluation import plots
from medlens.evaluation.baseline import baseline_sentence
from medlens.evaluation.curves import pr_curves, roc_curves, tpr_at
from medlens.evaluation.metrics import evaluate_predictions, reliability_curve
from medlens.jobs.evaluate import evaluate, format_metrics
from medlens.reports.evaluation import RESEARCH_NOTICE, ReportInputs, write_report

TINY = tiny_run("train.epochs=1")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# ---------------------------------------------------------------------------------------------- synthetic


def _multilabel(n: int = 80, seed: int = 0) -> dict:
    """Scores that carry signal for two labels; a third label has no positive at all (AUC undefined)."""
    rng = np.random.default_rng(seed)
    labels = ["Effusion", "a<b>&c", "Hernia"]
    y = np.zeros((n, 3))
    y[:, :2] = rng.random((n, 2)) < 0.35
    y[rng.random(n) < 0.1, 0] = np.nan
    p = np.clip(0.35 * np.nan_to_num(y) + 0.65 * rng.random((n, 3)), 0, 1)
    patients = np.array([f"P{i // 2:03d}" for i in range(n)])
    frame = pd.DataFrame({"sex": rng.choice(["F", "M"], n), "age": rng.integers(20, 90, n)})
    return {"task": "multilabel", "y": y, "p": p, "labels": labels, "patients": patients, "frame": frame}


def _multiclass(n: int = 90, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    labels = ["covid19", "normal", "bacterial", "viral"]
    classes = rng.integers(0, 4, n)
    y = np.eye(4)[classes]
    logits = rng.normal(size=(n, 4)) + 1.5 * y
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    patients = np.array([f"P{i:03d}" for i in range(n)])
    frame = pd.DataFrame({"view": rng.choice(["PA", "AP"], n)})
    return {"task": "multiclass", "y": y, "p": p, "labels": labels, "patients": patients, "frame": frame}


def _metrics(data: dict) -> dict:
    """metrics.json as ``evaluate`` writes it: evaluate_predictions plus calibration and provenance."""
    metrics = evaluate_predictions(
        data["task"],
        data["y"],
        data["p"],
        data["labels"],
        data["patients"],
        n_resamples=200,
        frame=data["frame"],
        subgroup_columns=list(data["frame"].columns),
    )
    metrics["calibration"] = {"temperature": 1.3, "ece_t1": 0.12, "ece": metrics["ece"]}
    metrics["evaluated_on"] = {"source": "/data/<synthetic>", "split": None, "description": "all images"}
    return metrics


def _inputs(data: dict, **extra) -> ReportInputs:
    manifest = {
        "task": data["task"],
        "labels": data["labels"],
        "model": {"name": "tiny", "num_classes": len(data["labels"]), "head": "linear"},
        "preprocessing": {"image_size": 48, "channels": 1, "mean": [0.5], "std": [0.25], "resize": "squash"},
        "data": {"source": "/data/<synthetic>", "kind": "csv"},
        "config": {"train": {"threshold_method": "youden"}},
        "thresholds": [0.5] * len(data["labels"]),
        "temperature": 1.3,
        "created": "2025-01-01T00:00:00+00:00",
        "versions": {"medlens": "0.1.0"},
    }
    args = (data["task"], data["y"], data["p"], data["labels"])
    return ReportInputs(
        manifest=manifest,
        roc=roc_curves(*args, data["patients"], n_resamples=200),
        pr=pr_curves(*args),
        reliability={"T = 1": reliability_curve(data["y"], data["p"], data["task"])},
        **extra,
    )


def test_roc_curves_match_sklearn_and_the_band_holds_the_curve():
    data = _multilabel()
    curves = roc_curves("multilabel", data["y"], data["p"], data["labels"], data["patients"], n_resamples=300)
    for j, curve in enumerate(curves[:2]):
        known = np.isfinite(data["y"][:, j])
        assert curve.auc == pytest.approx(roc_auc_score(data["y"][known, j], data["p"][known, j]))
        assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(curve.auc)
        point = tpr_at(curve.fpr, curve.tpr, curve.grid)
        assert np.all(curve.tpr_lo <= curve.tpr_hi)
        assert np.mean((curve.tpr_lo <= point + 1e-9) & (point <= curve.tpr_hi + 1e-9)) > 0.9
    hernia = curves[2]
    assert hernia.auc is None and hernia.tpr_lo is None and len(hernia.fpr) == 0 and hernia.n_positive == 0
    again = roc_curves("multilabel", data["y"], data["p"], data["labels"], data["patients"], n_resamples=300)
    assert np.array_equal(again[0].tpr_lo, curves[0].tpr_lo), "same seed, same band"


def test_tpr_at_takes_the_top_of_a_vertical_step_and_interpolates_ties():
    fpr, tpr = np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0, 1.0])
    assert tpr_at(fpr, tpr, np.array([0.0, 0.25, 0.5, 1.0])).tolist() == [0.5, 0.75, 1.0, 1.0]


def _png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png)).size


def test_every_plot_is_a_png_of_a_sensible_size(tmp_path):
    ml, mc = _multilabel(), _multiclass()
    ml_inputs, mc_metrics = _inputs(ml), _metrics(mc)
    history = pd.DataFrame(
        {"epoch": [0, 1, 2], "train_loss": [0.9, 0.6, 0.5], "val_loss": [0.8, 0.7, 0.7], "val_auc": [0.6, 0.7, 0.72]}
    )
    images = [np.full((48, 48), 40 * i, dtype=np.uint8) for i in range(5)]
    pngs = {
        "roc": plots.plot_roc(ml_inputs.roc, operating_points={"Effusion": (0.3, 0.7)}),
        "bands": plots.plot_roc_bands(ml_inputs.roc),
        "pr": plots.plot_pr(ml_inputs.pr),
        "confusion": plots.plot_confusion(mc_metrics["confusion"], mc_metrics["confusion_normalized"], mc["labels"]),
        "reliability": plots.plot_reliability(ml_inputs.reliability),
        "history": plots.plot_history(history, tmp_path / "history.png"),
        "samples": plots.plot_samples(images, [f"true: a\npred: b {i}" for i in range(5)], [True, False] * 2 + [True]),
    }
    for name, png in pngs.items():
        width, height = _png_size(png)
        assert 300 <= width <= 2500 and 200 <= height <= 3000, (name, width, height)
        assert len(png) > 5_000, name
    assert (tmp_path / "history.png").read_bytes() == pngs["history"]


def _check_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", page)
    assert sources, "the report embeds its figures"
    for source in sources:
        assert source.startswith("data:image/png;base64,"), source[:80]
        _png_size(base64.b64decode(source.split(",", 1)[1]))


@pytest.mark.parametrize("make", [_multilabel, _multiclass])
def test_report_is_one_self_contained_escaped_file(tmp_path, make):
    data = make()
    metrics = _metrics(data)
    history = pd.DataFrame({"epoch": [0, 1], "train_loss": [0.9, 0.6], "val_loss": [0.8, 0.7]})
    samples = plots.plot_samples([np.zeros((32, 32), dtype=np.uint8)], ["true: x\npred: y"], [False])
    path = write_report(tmp_path, metrics, _inputs(data, samples_png=samples, history=history))
    assert path == tmp_path / "report.html" and not list(tmp_path.glob(".*tmp"))
    page = path.read_text(encoding="utf-8")
    _check_self_contained(page)
    assert RESEARCH_NOTICE in page and "not for diagnosis" in page
    assert "/data/&lt;synthetic&gt;" in page and "/data/<synthetic>" not in page
    for name in data["labels"]:
        assert f">{name.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}<" in page
    for section in ("summary", "per-label", "curves", "calibration", "subgroups", "samples", "training", "model-card"):
        assert f'id="{section}"' in page
    if data["task"] == "multilabel":
        assert "a<b>&c" not in page
        assert metrics["auc"]["Hernia"] is None
        hernia_row = re.search(r"<tr><td>Hernia</td>(.*?)</tr>", page).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", hernia_row)
        assert "undefined" in cells[2] and "undefined" in cells[3], "AUC and its CI of a label with no positive"
        assert "0.000" not in cells[2] and "1.000" not in cells[2]
    else:
        assert "balanced accuracy" in page and "Confusion matrix" in page


def test_format_metrics_says_undefined():
    text = format_metrics(_metrics(_multilabel()))
    hernia = next(line for line in text.splitlines() if line.startswith("Hernia"))
    assert hernia.split()[1:] == ["undefined", "undefined", "undefined"]


# ---------------------------------------------------------------------------------------------- end to end


def _check_evaluation(out: Path, labels_with_no_positive: set[str] | None = None) -> dict:
    """The three files, metrics.json's keys, and every AUC against sklearn on predictions.csv."""
    assert {"predictions.csv", "metrics.json", "report.html"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRICS_JSON_KEYS
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == metrics["n_images"]
    assert metrics["n_patients"] == predictions["patient_id"].nunique()
    truth = predictions[[f"true_{n}" for n in metrics["labels"]]].to_numpy(dtype=float)
    if metrics["task"] == "multiclass":
        truth[~np.isfinite(truth).all(axis=1)] = np.nan
    for j, name in enumerate(metrics["labels"]):
        known = np.isfinite(truth[:, j])
        y, p = truth[known, j], predictions[f"prob_{name}"].to_numpy()[known]
        if 0 < y.sum() < len(y):
            assert metrics["auc"][name] == pytest.approx(roc_auc_score(y, p), abs=1e-12), name
        else:
            assert metrics["auc"][name] is None and metrics["auc_ci"][name] is None, name
    if labels_with_no_positive is not None:
        assert {n for n in metrics["labels"] if metrics["auc"][n] is None} >= labels_with_no_positive
    _check_self_contained((out / "report.html").read_text(encoding="utf-8"))
    return metrics


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("phantoms") / "run"
    empty = run.parent / "empty.yaml"
    empty.write_text("{}\n")
    assert main(["train", str(empty), "--out", str(run), *_sets(TINY)]) == 0
    return run


@pytest.fixture(scope="module")
def phantom_evaluation(phantom_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluation")
    assert main(["evaluate", str(phantom_run), "--out", str(out), "--resamples", "200"]) == 0
    return out


def test_evaluate_writes_predictions_metrics_and_report(phantom_run, phantom_evaluation, capsys):
    metrics = _check_evaluation(phantom_evaluation)
    splits = pd.read_csv(phantom_run / "splits.csv")
    test = set(splits.loc[splits["split"] == "test", "path"])
    predictions = pd.read_csv(phantom_evaluation / "predictions.csv")
    assert set(predictions["path"]) == test, "the run's own data: only its test split is scored"
    assert metrics["evaluated_on"]["split"] == "test"
    assert metrics["calibration"]["temperature"] > 0 and "ece_t1" in metrics["calibration"]
    page = (phantom_evaluation / "report.html").read_text(encoding="utf-8")
    assert all(name in page for name in metrics["labels"]) and RESEARCH_NOTICE in page


def test_evaluate_scores_another_source_whole_and_a_named_split(phantom_run, tmp_path):
    from medlens.data.phantoms import generate_phantoms

    other = generate_phantoms(tmp_path / "other", n=12, task="multilabel", size=64, seed=7, progress=False)
    whole = evaluate(phantom_run, tmp_path / "whole", source=other, n_resamples=50, progress=False)
    assert whole.metrics["n_images"] == 12 and whole.metrics["evaluated_on"]["split"] is None
    assert whole.report == tmp_path / "whole" / "report.html" and whole.report.exists()
    with pytest.raises(DataSourceError, match="--split val needs the run's own data"):
        evaluate(phantom_run, tmp_path / "bad", source=other, split="val", n_resamples=50, progress=False)
    val = evaluate(phantom_run, tmp_path / "val", split="val", n_resamples=50, progress=False)
    splits = pd.read_csv(phantom_run / "splits.csv")
    assert val.metrics["n_images"] == int((splits["split"] == "val").sum())


def test_a_bare_checkpoint_on_its_own_data_is_flagged_optimistic(phantom_run, tmp_path):
    shutil.copytree(phantom_run / "best", tmp_path / "checkpoint")
    result = evaluate(tmp_path / "checkpoint", tmp_path / "out", n_resamples=50, progress=False)
    where = result.metrics["evaluated_on"]
    assert where["split"] is None and "optimistic" in where["note"]
    assert result.metrics["n_images"] == len(pd.read_csv(phantom_run / "splits.csv"))
    assert "optimistic" in result.report.read_text(encoding="utf-8")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup-system.sh installs it)")
def test_chromium_renders_the_report(phantom_evaluation, tmp_path):
    shot = tmp_path / "report.png"
    command = [
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        (phantom_evaluation / "report.html").as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    assert (pixels < 128).mean() > 0.01, "too little ink: the page did not render"


@pytest.mark.shared
@pytest.mark.parametrize(("config", "dataset"), [("cxr4", "cxr4"), ("nih14", "nih14")])
def test_evaluate_real_data(tmp_path, shared_data, config, dataset, capsys):
    run, out, source = tmp_path / "run", tmp_path / "evaluation", shared_data / dataset
    overrides = short_real_run(source, tmp_path / "cache")
    assert main(["train", config, "--out", str(run), *_sets(overrides)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(source), "--out", str(out), "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "report: " in printed and str(out / "report.html") in printed
    splits = pd.read_csv(run / "splits.csv")
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions["path"]) == set(splits.loc[splits["split"] == "test", "path"])
    no_positive = {
        c.removeprefix("true_") for c in predictions.columns if c.startswith("true_") and predictions[c].sum() == 0
    }
    metrics = _check_evaluation(out, no_positive)
    assert metrics["task"] == ("multiclass" if dataset == "cxr4" else "multilabel")
    if dataset == "nih14":
        assert no_positive, "the nih14 test split was expected to miss some rare finding"
        assert all(metrics["auc"][name] is None for name in no_positive)


# ---------------------------------------------------------------------------------------------- pixel baseline


def test_evaluate_lays_the_pixel_baseline_beside_the_model(phantom_run, phantom_evaluation):
    metrics = json.loads((phantom_evaluation / "metrics.json").read_text())
    baseline = metrics["baseline"]
    splits = pd.read_csv(phantom_run / "splits.csv")
    assert baseline["n_train"] == (splits["split"] == "train").sum() and baseline["size"] == 32
    assert set(baseline["auc"]) == set(metrics["labels"]) and baseline["scored"]
    for name in baseline["scored"]:
        assert 0.0 <= baseline["auc"][name] <= 1.0 and isinstance(baseline["model_better"][name], bool)
    assert set(baseline["labels_compared"]) <= set(metrics["auc_summary_over"]["labels"])
    page = (phantom_evaluation / "report.html").read_text(encoding="utf-8")
    assert 'id="baseline"' in page and "logistic regression on 32 x 32 standardised pixels" in page
    assert baseline_sentence(baseline) in format_metrics(metrics)


def test_auc_summaries_say_which_labels_they_average(phantom_evaluation):
    metrics = json.loads((phantom_evaluation / "metrics.json").read_text())
    over = metrics["auc_summary_over"]
    assert over["min_positives"] == 5 and set(over["labels"]) | set(over["excluded"]) == set(metrics["labels"])
    for name in over["labels"]:
        assert metrics["per_class"][name]["n_positive"] >= 5 and metrics["auc"][name] is not None
    assert "with >= 5 positives" in format_metrics(metrics)


def test_evaluate_without_the_training_split_omits_the_baseline_in_one_line(phantom_run, tmp_path, caplog):
    from medlens.data.phantoms import generate_phantoms

    bare = tmp_path / "elsewhere" / "best"
    shutil.copytree(phantom_run / "best", bare)  # the checkpoint alone: no splits.csv, as on another machine
    other = generate_phantoms(tmp_path / "other", n=12, task="multilabel", size=64, seed=7, progress=False)
    result = evaluate(bare, tmp_path / "e", source=other, n_resamples=20, progress=False)
    omitted = "no splits.csv beside the checkpoint, so no training split to fit it on"
    assert result.metrics["baseline"] == {"omitted": omitted}
    assert [r for r in caplog.records if r.getMessage().startswith("no pixel baseline: ")]
    assert "No pixel baseline: no splits.csv" in result.report.read_text(encoding="utf-8")
