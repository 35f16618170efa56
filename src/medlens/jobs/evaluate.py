"""``medlens evaluate``: predictions over a data source or a run's own split, every metric, the report.

Which images are scored: the whole SOURCE when it is not the data the run trained on; when it is (no
``--data``, the same source, or any of its images in the run's training or validation split), only the
run's ``test`` split (or the split named), so a model is never scored on images it learned from. Images
the model cannot answer for (a face model's photos without a face) are left out of the metrics, counted
in ``n_left_out`` with the reason, and listed in predictions.csv with their problem.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlens.data.records import RecordTable, load_source
from medlens.errors import DataSourceError
from medlens.evaluation.baseline import baseline_sentence
from medlens.inference import Model, load_model
from medlens.io import write_atomic
from medlens.reports.evaluation import summary_scope
from medlens.runs import HISTORY_FILE, SPLITS_FILE

log = logging.getLogger(__name__)

SUBGROUP_COLUMNS = ("sex", "age", "view", "source_repo")
N_SAMPLES = 12
VALIDATION_NOTE = (
    "the validation split chose the best epoch, the temperature and the thresholds: these numbers are optimistic"
)


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    table: RecordTable
    probs: np.ndarray
    report: Path


@dataclass(frozen=True)
class EvaluationData:
    """The images to score and how they were chosen (``split`` None: the whole source)."""

    table: RecordTable
    source: Path
    split: str | None
    note: str | None = None

    def describe(self) -> dict[str, Any]:
        if self.split is None:
            description = f"all {len(self.table)} images of {self.source}"
        else:
            description = f"the run's {self.split!r} split of {self.source} ({len(self.table)} images)"
        return {"source": str(self.source), "split": self.split, "description": description, "note": self.note}


def _listed(labels: Sequence[str], most: int = 6) -> str:
    """Up to ``most`` labels, comma-separated, and how many more."""
    shown = ", ".join(labels[:most])
    return shown if len(labels) <= most else f"{shown} and {len(labels) - most} more"


def _root_of(source: Path) -> Path:
    """The folder a source's image paths are relative to: the folder itself, or a CSV's folder."""
    return source if source.is_dir() else source.parent


def evaluation_data(predictor: Model, source: str | Path | None, split: str | None) -> EvaluationData:
    """The images to evaluate: the run's own ``split`` of its training data, or the whole other source."""
    trained = predictor.manifest["data"]
    trained_on = Path(trained["source"])
    if source is None:
        if not trained_on.exists():
            raise DataSourceError(f"the run trained on {trained_on}, which no longer exists: pass --data SOURCE")
        table = load_source(trained_on, trained.get("kind"))
        source_path = trained_on
    else:
        source_path = Path(source).resolve()
        table = load_source(source_path)
    splits_file = predictor.path.parent / SPLITS_FILE if predictor.path is not None else None
    saved = pd.read_csv(splits_file, dtype=str) if splits_file is not None and splits_file.exists() else None
    image_paths = pd.Series([str(p) for p in table.paths])
    if saved is not None:
        root = _root_of(trained_on)
        split_of = pd.Series(saved["split"].to_numpy(), index=[str(root / p) for p in saved["path"]])
        learned_from = image_paths.isin(split_of.index[split_of.isin(["train", "val"])])
        same_data = source is None or source_path == trained_on or bool(learned_from.any())
    else:
        same_data = source is None or source_path == trained_on
    if not same_data:
        if split is not None:
            raise DataSourceError(
                f"--split {split} needs the run's own data; {source_path} is not what it trained on ({trained_on})"
            )
        if not set(predictor.labels) & set(table.label_names):
            raise DataSourceError(
                f"{source_path} is labelled {_listed(table.label_names)}, none of the model's labels "
                f"({_listed(predictor.labels)}): evaluate on images labelled with those, or use "
                "`medlens predict` to score images without them"
            )
        log.info("evaluating all %d images of %s (not the run's training data)", len(table), source_path)
        return EvaluationData(table.relabel(predictor.labels), source_path, None)
    if saved is None:
        if split is not None:
            raise DataSourceError(
                f"--split {split}: no {SPLITS_FILE} beside the checkpoint {predictor.path}; pass the run folder"
            )
        note = (
            f"no {SPLITS_FILE} beside the checkpoint: every image of the training source is scored, including "
            "images the model learned from, so these numbers are optimistic"
        )
        log.warning(note)
        return EvaluationData(table.relabel(predictor.labels), source_path, None, note)
    asked, split = split, split or "test"
    wanted = set(split_of.index[split_of == split])
    if not wanted and asked is None:
        raise DataSourceError(
            f"the run kept no test split ({splits_file} has {sorted(set(saved['split']))}; data.test_fraction: 0): "
            "pass --data with images it never saw, or --split val (optimistic: its best epoch, temperature and "
            "thresholds were chosen on those images)"
        )
    if not wanted:
        raise DataSourceError(f"{splits_file} has no {split!r} split; splits are {sorted(set(saved['split']))}")
    rows = np.flatnonzero(image_paths.isin(wanted).to_numpy())
    if len(rows) == 0:
        raise DataSourceError(f"none of the {len(wanted)} images of the {split!r} split is in {source_path}")
    log.info("evaluating the run's %s split: %d images", split, len(rows))
    note = VALIDATION_NOTE if split == "val" else None
    return EvaluationData(table.subset(rows).relabel(predictor.labels), source_path, split, note)


def evaluate(
    checkpoint: str | Path,
    out: str | Path,
    source: str | Path | None = None,
    split: str | None = None,
    n_resamples: int = 1000,
    progress: bool = True,
    device: str = "auto",
) -> Evaluation:
    """Predict, then write predictions.csv, metrics.json and report.html in ``out``."""
    from medlens.evaluation.audit import source_performance
    from medlens.evaluation.metrics import evaluate_predictions, reliability_curve, to_jsonable
    from medlens.jobs.baseline import pixel_baseline

    predictor = load_model(checkpoint, device=device)
    data = evaluation_data(predictor, source, split)
    task, temperature = predictor.task, predictor.temperature
    scores = predictor.logits_paths(data.table.paths, progress=progress)
    answered = scores.answered
    predictions = _predictions_frame(data.table, predictor.probabilities(scores.values), predictor.labels, scores)
    table, logits = data.table.subset(np.flatnonzero(answered)), scores.values[answered]
    if len(table) == 0:
        raise DataSourceError(f"the model answered for none of the {len(answered)} images ({_reasons(scores)})")
    probs = predictor.probabilities(logits)
    frame = table.frame
    metrics = evaluate_predictions(
        task,
        table.labels,
        probs,
        predictor.labels,
        table.patient_ids,
        thresholds=predictor.thresholds,
        n_resamples=n_resamples,
        frame=frame,
        subgroup_columns=[c for c in SUBGROUP_COLUMNS if c in frame.columns],
    )
    raw = reliability_curve(table.labels, predictor.probabilities(logits, 1.0), task)
    metrics["calibration"] = to_jsonable({"temperature": temperature, "ece_t1": raw.ece, "ece": metrics["ece"]})
    metrics["evaluated_on"] = {**data.describe(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    metrics["shortcuts"] = source_performance(task, table.labels, probs, table.patient_ids, frame, n_resamples)
    metrics["n_left_out"] = int((~answered).sum())
    metrics["left_out_because"] = _reasons(scores) if metrics["n_left_out"] else None
    metrics["baseline"] = pixel_baseline(predictor.path, predictor.manifest, table, metrics)
    data = EvaluationData(table, data.source, data.split, data.note)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "predictions.csv", predictions.to_csv(index=False))
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    reliability = {"T = 1 (raw model)": raw}
    if temperature != 1.0:
        reliability[f"T = {temperature:.2f} (served)"] = reliability_curve(table.labels, probs, task)
    report = _write_report(out, predictor, data, metrics, probs, reliability, n_resamples)
    return Evaluation(metrics, predictions, table, probs, report)


def _reasons(scores: Any) -> str:
    """The distinct reasons the model gave no answer, e.g. ``no face``."""
    return ", ".join(sorted({p.code.replace("_", " ") for p in scores.problems if p is not None})) or "none"


def _write_report(
    out: Path,
    predictor: Model,
    data: EvaluationData,
    metrics: dict[str, Any],
    probs: np.ndarray,
    reliability: dict[str, Any],
    n_resamples: int,
) -> Path:
    from medlens.evaluation.audit import verdicts
    from medlens.evaluation.curves import pr_curves, roc_curves
    from medlens.evaluation.plots import plot_samples
    from medlens.reports.audit import evaluation_section
    from medlens.reports.evaluation import ReportInputs, write_report

    table, task, labels = data.table, predictor.task, predictor.labels
    calls, usable, right = call_outcomes(task, table.labels, probs, predictor.thresholds)
    rows = choose_samples(usable, right)
    images = [predictor.prepare(predictor.read(table.paths[i])) for i in rows]
    captions = [_caption(labels, table.labels[i], probs[i], calls[i]) for i in rows]
    shortcuts = metrics.get("shortcuts")
    history_file = predictor.path.parent / HISTORY_FILE if predictor.path is not None else None
    inputs = ReportInputs(
        manifest=predictor.manifest,
        roc=roc_curves(task, table.labels, probs, labels, table.patient_ids, n_resamples=n_resamples),
        pr=pr_curves(task, table.labels, probs, labels),
        reliability=reliability,
        samples_png=plot_samples(images, captions, right[rows].tolist()) if rows else None,
        history=pd.read_csv(history_file) if history_file is not None and history_file.exists() else None,
        sections=[evaluation_section(shortcuts, verdicts({"groups": shortcuts})[0]["line"] if shortcuts else None)],
    )
    return write_report(out, metrics, inputs)


def call_outcomes(
    task: str, y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calls, usable, right): the 0/1 calls per image and label (the top class for multi-class, else
    ``prob >= threshold``), whether an image has a known label, and whether every known label agrees."""
    from medlens.evaluation.metrics import class_indices

    if task == "multiclass":
        calls = np.eye(probs.shape[1])[probs.argmax(axis=1)]
        known = np.broadcast_to(class_indices(y_true)[1][:, None], y_true.shape)
    else:
        calls = (probs >= np.asarray(thresholds)).astype(np.float64)
        known = np.isfinite(y_true)
    usable = known.any(axis=1)
    right = usable & np.where(known, calls == y_true, True).all(axis=1)
    return calls, usable, right


def choose_samples(usable: np.ndarray, right: np.ndarray, n: int = N_SAMPLES, seed: int = 0) -> list[int]:
    """Rows to show: up to half of them wrong calls, the rest right ones, drawn at random (fixed seed)."""
    rng = np.random.default_rng(seed)
    wrong_rows = rng.permutation(np.flatnonzero(usable & ~right))[: n // 2]
    right_rows = rng.permutation(np.flatnonzero(right))[: n - len(wrong_rows)]
    return sorted(int(i) for i in np.r_[wrong_rows, right_rows])


def _names(names: Sequence[str], limit: int = 2) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} +{len(names) - limit}"


def _caption(labels: Sequence[str], truth: np.ndarray, probs: np.ndarray, calls: np.ndarray) -> str:
    """'true: ...' and 'pred: ...' lines for one image; predicted labels carry their probability."""
    truth_names = [name for name, t in zip(labels, truth, strict=True) if t == 1]
    called = [f"{name} ({p:.2f})" for name, p, c in zip(labels, probs, calls, strict=True) if c == 1]
    return f"true: {_names(truth_names)}\npred: {_names(called)}"


def _predictions_frame(table: RecordTable, probs: np.ndarray, labels: list[str], scores: Any) -> pd.DataFrame:
    frame = pd.DataFrame({"path": table.frame["path"].astype(str), "patient_id": table.patient_ids})
    for j, name in enumerate(labels):
        frame[f"true_{name}"] = table.labels[:, j]
    for j, name in enumerate(labels):
        frame[f"prob_{name}"] = probs[:, j]
    frame["problem"] = ["" if p is None else p.detail for p in scores.problems]
    return frame


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """A compact table: AUC with its CI and AP per label, then the summary lines."""
    level = f"{metrics.get('ci_level', 0.95):.0%} CI"
    lines = [f"{'label':<22} {'AUC':>9}  {level:>15}  {'AP':>9}"]
    for name, auc in metrics["auc"].items():
        ci = metrics["auc_ci"].get(name)
        shown_ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "undefined"
        lines.append(f"{name:<22} {_shown(auc):>9}  {shown_ci:>15}  {_shown(metrics['ap'].get(name)):>9}")
    summary = metrics.get("auc_summary") or {}
    if summary.get("mean") is not None:
        lines.append("AUC  mean {mean:.3f}  median {median:.3f}  min {min:.3f}  max {max:.3f}".format(**summary))
    if metrics.get("auc_summary_over") and metrics["task"] == "multilabel":
        lines.append(f"AUC summary {summary_scope(metrics)}")
    if metrics.get("accuracy") is not None:
        top_k = "  ".join(f"{k.replace('_', '-')} {_shown(v)}" for k, v in (metrics.get("top_k") or {}).items())
        lines.append(
            f"accuracy {_shown(metrics['accuracy'])}  balanced accuracy {_shown(metrics['balanced_accuracy'])}"
            + (f"  {top_k}" if top_k else "")
        )
    calibration = metrics.get("calibration") or {}
    if calibration:
        lines.append(
            f"ECE {_shown(calibration.get('ece'))} at T {calibration['temperature']:.2f}"
            f" ({_shown(calibration.get('ece_t1'))} at T 1)"
        )
    else:
        lines.append(f"ECE {_shown(metrics.get('ece'))}")
    lines.append(f"{metrics['n_images']} images, {metrics['n_patients']} patients")
    if "baseline" in metrics:
        lines.append(baseline_sentence(metrics["baseline"]))
    return "\n".join(lines)
