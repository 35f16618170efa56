"""report.html: one self-contained page a clinical reviewer can read offline.

Everything is inline: CSS in a ``<style>`` block, figures as base64 PNG data URIs, no script and no
external resource, so the file can be mailed or archived on its own. The page only displays numbers
computed elsewhere (metrics.json, :mod:`medlens.evaluation.curves`); an undefined number is shown as
"undefined", never as 0 or 1. All text from data, configs and manifests is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlens.evaluation import plots
from medlens.evaluation.baseline import baseline_sentence
from medlens.evaluation.curves import PrCurve, RocCurve
from medlens.evaluation.metrics import ReliabilityCurve
from medlens.io import write_atomic

REPORT_FILE = "report.html"
RESEARCH_NOTICE = (
    "For research only, not for diagnosis. This model and report have not been cleared or approved as a "
    "medical device; do not use them to diagnose, triage or treat patients."
)
INTENDED_USE = (
    "Research and education: studying transfer-learning classifiers on medical images, their errors, "
    "calibration and explanations. Not for clinical use. Performance outside the evaluated data "
    "(other hospitals, scanners, views, populations or label definitions) is unknown."
)
UNDEFINED = "undefined"

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1f2328; background: #fff; margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; margin: 20px 0 8px; }
p.sub { color: #57606a; margin: 0 0 14px; }
.notice { border: 2px solid #b42318; background: #fef3f2; color: #7a271a; padding: 10px 14px;
          border-radius: 6px; font-weight: 600; margin: 14px 0; }
nav { font-size: 13px; margin: 10px 0 0; }
nav a { color: #0b57d0; margin-right: 14px; text-decoration: none; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e4e7eb; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { background: none; color: #57606a; font-weight: 500; }
table.groups th { white-space: normal; overflow-wrap: anywhere; max-width: 16em; }
table.groups td:first-child { white-space: nowrap; }
.undef { color: #8c959f; font-style: italic; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 12.5px; margin-top: 4px; }
.note { color: #57606a; font-size: 13px; }
details pre { background: #f6f8fa; padding: 10px; font-size: 12px; overflow-x: auto; }
footer { margin-top: 40px; }
"""


@dataclass
class ReportInputs:
    """What the page shows besides metrics.json: the checkpoint manifest, curves and extra pictures.

    ``reliability`` maps a name ("T = 1", "T = 1.52 (served)") to its bins; ``samples_png`` is a grid of
    captioned images; ``history`` is the run's history.csv. From metrics.json the page also reads the
    optional ``evaluated_on`` (source, split, description, note, date) and ``calibration`` (temperature,
    ece_t1, ece) that ``evaluate`` adds.
    """

    manifest: Mapping[str, Any]
    roc: Sequence[RocCurve] = ()
    pr: Sequence[PrCurve] = ()
    reliability: Mapping[str, ReliabilityCurve] = field(default_factory=dict)
    samples_png: bytes | None = None
    history: pd.DataFrame | None = None
    sections: Sequence[tuple[str, str, str]] = ()
    """(anchor, title, body HTML) of sections another job adds (evaluate: the per-source shortcut check)."""


# ---------------------------------------------------------------------------------------------- cells


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _undefined() -> str:
    return f'<span class="undef">{UNDEFINED}</span>'


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return _undefined()
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{value:.{digits}f}"


def _ci(interval: Sequence[float] | None) -> str:
    return _undefined() if not interval else f"{interval[0]:.3f} – {interval[1]:.3f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1, css_class: str = "") -> str:
    """An HTML table; cells are already-escaped HTML; columns from ``numeric_from`` are right-aligned."""

    def cells(values: Sequence[str], tag: str) -> str:
        return "".join(
            f'<{tag} class="num">{v}</{tag}>' if i >= numeric_from else f"<{tag}>{v}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    head = f"<thead><tr>{cells(header, 'th')}</tr></thead>"
    attributes = f' class="{css_class}"' if css_class else ""
    return f'<div class="scroll"><table{attributes}>{head}<tbody>{body}</tbody></table></div>'


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{esc(key)}</th><td>{value}</td></tr>" for key, value in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def figure_html(png: bytes, caption: str, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


@dataclass(frozen=True)
class _Section:
    anchor: str
    title: str
    body: str

    def html(self) -> str:
        return section_html(self.anchor, self.title, self.body)


def section_html(anchor: str, title: str, body: str) -> str:
    """A report section: its heading (escaped) over ``body`` (HTML), linkable as ``#anchor``."""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


# ---------------------------------------------------------------------------------------------- sections


def _summary(metrics: Mapping[str, Any], inputs: ReportInputs) -> _Section:
    summary = metrics.get("auc_summary") or {}
    where = metrics.get("evaluated_on") or {}
    pairs = [
        ("task", esc(metrics["task"])),
        ("images / patients", f"{metrics['n_images']} / {metrics['n_patients']}"),
        ("evaluated on", esc(where.get("description", where.get("source", UNDEFINED)))),
        ("model", esc(inputs.manifest.get("model", {}).get("name", UNDEFINED))),
        (
            "AUC over labels",
            f"mean {_num(summary.get('mean'))}, median {_num(summary.get('median'))}, "
            f"min {_num(summary.get('min'))}, max {_num(summary.get('max'))}"
            f" ({sum(v is not None for v in metrics['auc'].values())} of {len(metrics['labels'])} defined)",
        ),
    ]
    if metrics["task"] == "multilabel" and metrics.get("auc_summary_over"):
        pairs.append(("AUC summary", esc(summary_scope(metrics))))
    if "baseline" in metrics:
        pairs.append(("pixel baseline", esc(baseline_sentence(metrics["baseline"]))))
    if metrics["task"] == "multiclass":
        pairs.append(("accuracy", _num(metrics.get("accuracy"))))
        pairs.append(("balanced accuracy", _num(metrics.get("balanced_accuracy"))))
        for name, value in (metrics.get("top_k") or {}).items():
            pairs.append((name.replace("_", "-") + " accuracy", _num(value)))
    pairs.append(("ECE (served probabilities)", _num(metrics.get("ece"))))
    if where.get("note"):
        pairs.append(("note", esc(where["note"])))
    return _Section("summary", "Summary", key_values(pairs))


def _per_label(metrics: Mapping[str, Any]) -> _Section:
    level = f"{metrics.get('ci_level', 0.95):.0%}"
    auc, ci, ap = metrics["auc"], metrics["auc_ci"], metrics["ap"]
    if metrics["task"] == "multilabel":
        header = ["label", "known", "positives", "AUC", f"{level} CI", "AP", "threshold"]
        header += ["sensitivity", "specificity", "PPV", "NPV", "F1"]
        rows = []
        for name in metrics["labels"]:
            c = metrics["per_class"][name]
            rows.append(
                [esc(name), str(c["n_known"]), str(c["n_positive"]), _num(auc[name]), _ci(ci[name])]
                + [_num(ap[name]), _num(c["threshold"])]
                + [_num(c[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "f1")]
            )
        note = (
            f"AUC with its {level} patient-bootstrap interval ({metrics.get('n_resamples')} resamples of "
            "patients); sensitivity to F1 at the checkpoint's operating threshold (positive when "
            "probability ≥ threshold). Rows with an unknown label are left out of that label."
        )
        return _Section("per-label", "Per-label results", _table(header, rows) + f'<p class="note">{esc(note)}</p>')
    header = ["class", "support", "precision", "recall", "F1", "AUC (one-vs-rest)", f"{level} CI", "AP"]
    rows = []
    for name in metrics["labels"]:
        c = metrics["per_class"][name]
        scores = [_num(c[k]) for k in ("precision", "recall", "f1")]
        rows.append([esc(name), str(c["support"]), *scores, _num(auc[name]), _ci(ci[name]), _num(ap[name])])
    macro = metrics.get("macro_avg") or {}
    macro_cells = [_num(macro.get(k)) for k in ("precision", "recall", "f1")]
    rows.append(["<b>macro average</b>", "", *macro_cells, _num(metrics.get("macro_auc")), "", ""])
    confusion_rows = [
        [esc(name)] + [str(v) for v in row] for name, row in zip(metrics["labels"], metrics["confusion"], strict=True)
    ]
    confusion = _table(["true \\ predicted", *(esc(n) for n in metrics["labels"])], confusion_rows)
    note = "The predicted class is the highest probability. Rows of the confusion matrix are true classes."
    body = _table(header, rows) + "<h3>Confusion matrix (counts)</h3>" + confusion + f'<p class="note">{note}</p>'
    return _Section("per-label", "Per-class results", body)


def summary_scope(metrics: Mapping[str, Any]) -> str:
    """Which labels the AUC summary averages, e.g. 'over 12 of 14 labels with >= 5 positives (left out: ...)'."""
    over = metrics["auc_summary_over"]
    n, shown = over["min_positives"], f"over {len(over['labels'])} of {len(metrics['labels'])} labels"
    left_out = f" (left out: {', '.join(over['excluded'])})" if over["excluded"] else ""
    return f"{shown} with >= {n} positive{'s' if n != 1 else ''} and a defined AUC{left_out}"


def _baseline(metrics: Mapping[str, Any]) -> _Section | None:
    """The model's AUC beside the pixel baseline's, per label, saying plainly where the model does not beat it."""
    baseline = metrics.get("baseline")
    if baseline is None:
        return None
    sentence = f'<p><b>{esc(baseline_sentence(baseline))}</b></p>'
    if baseline.get("omitted"):
        return _Section("baseline", "Pixel baseline", sentence)
    verdicts = {True: "model better", False: "<b>model does not beat it</b>", None: _undefined()}
    rows = [
        [
            esc(name),
            _num(metrics["auc"][name]),
            _num(baseline["auc"][name]),
            verdicts[baseline["model_better"][name]],
            "yes" if name in baseline["labels_compared"] else "no",
        ]
        for name in metrics["labels"]
    ]
    mean = ["<b>mean over the labels compared</b>", _num(baseline["model_mean_auc"]), _num(baseline["mean_auc"])]
    rows.append([*mean, verdicts[baseline["model_better_overall"]], ""])
    header = ["label", "model AUC", "baseline AUC", "verdict", "in the mean"]
    note = (
        f"The baseline is {baseline['model']}, fitted on {baseline['n_train']} images of the run's own training "
        "split and scored on the images evaluated here. A model that does not beat it has learned little beyond "
        "what raw intensities say (exposure, burned-in text, the source's film). The mean is over the labels "
        "both score among those the AUC summary averages."
    )
    body = sentence + _table(header, rows, numeric_from=1) + f'<p class="note">{esc(note)}</p>'
    return _Section("baseline", "Pixel baseline", body)


def _operating_points(metrics: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """(FPR, TPR) at the operating threshold per multi-label label where both rates are defined."""
    if metrics["task"] != "multilabel":
        return {}
    points = {}
    for name, c in metrics["per_class"].items():
        if c["sensitivity"] is not None and c["specificity"] is not None:
            points[name] = (1.0 - c["specificity"], c["sensitivity"])
    return points


def _curves(metrics: Mapping[str, Any], inputs: ReportInputs) -> _Section | None:
    parts = []
    points = _operating_points(metrics)
    if inputs.roc:
        parts.append(
            figure_html(
                plots.plot_roc(inputs.roc, operating_points=points),
                "ROC curve of every label (dots: the operating threshold). Labels whose AUC is undefined "
                "(no positive or no negative image) are listed but not drawn.",
                "ROC curves of all labels",
            )
        )
        parts.append(
            figure_html(
                plots.plot_roc_bands(inputs.roc, operating_points=points, ci_level=metrics.get("ci_level", 0.95)),
                "Per-label ROC with the pointwise patient-bootstrap band of sensitivity at each false "
                "positive rate (same resamples as the AUC intervals).",
                "per-label ROC curves with bootstrap bands",
            )
        )
    if inputs.pr:
        parts.append(
            figure_html(
                plots.plot_pr(inputs.pr),
                "Precision-recall curves; a classifier with no skill has precision equal to the prevalence.",
                "precision-recall curves",
            )
        )
    if metrics["task"] == "multiclass" and metrics.get("confusion"):
        parts.append(
            figure_html(
                plots.plot_confusion(metrics["confusion"], metrics["confusion_normalized"], metrics["labels"]),
                "Confusion matrix: counts, and rows divided by the true class's support.",
                "confusion matrix heatmaps",
            )
        )
    return _Section("curves", "Curves", "".join(parts)) if parts else None


def _calibration(metrics: Mapping[str, Any], inputs: ReportInputs) -> _Section:
    calibration = metrics.get("calibration") or {}
    what = (
        "the top class's probability against whether it is right"
        if metrics["task"] == "multiclass"
        else "each known (image, label) probability against the label"
    )
    pairs = [
        ("temperature T", _num(calibration.get("temperature"))),
        ("ECE at T = 1 (raw model)", _num(calibration.get("ece_t1"))),
        ("ECE at T (served probabilities)", _num(metrics.get("ece"))),
        ("bins", str(len((metrics.get("reliability") or {}).get("centres") or []))),
    ]
    text = (
        f"Expected calibration error over equal-width confidence bins, comparing {what}. T was fitted on "
        "the run's validation split by minimising the negative log-likelihood; both ECEs are measured on "
        "the images evaluated here, from the same logits. A low ECE alone does not make a useful model: "
        "probabilities that never leave the base rate are well calibrated too; read it beside the AUCs."
    )
    body = key_values(pairs) + f'<p class="note">{esc(text)}</p>'
    if inputs.reliability:
        body += figure_html(plots.plot_reliability(inputs.reliability), "Reliability diagram", "reliability diagram")
    return _Section("calibration", "Calibration", body)


def _subgroups(metrics: Mapping[str, Any]) -> _Section:
    subgroups = metrics.get("subgroups") or {}
    if not subgroups:
        body = '<p class="note">No subgroup column (sex, age, view, source) in this data.</p>'
        return _Section("subgroups", "Subgroups", body)
    # Groups as columns, metrics as rows: a column has few groups but a model may have many labels.
    rows_of = {"macro AUC": lambda m: m["macro_auc"]}
    if metrics["task"] == "multiclass":
        rows_of |= {"accuracy": lambda m: m["accuracy"], "balanced accuracy": lambda m: m["balanced_accuracy"]}
    rows_of |= {f"AUC {name}": (lambda m, name=name: m["auc"][name]) for name in metrics["labels"]}
    parts = []
    for column, groups in subgroups.items():
        header = [esc(column), *(esc(value) for value in groups)]
        rows = [["images", *(str(group["n_images"]) for group in groups.values())]]
        for title, value_of in rows_of.items():
            cells = [_undefined() if g["metrics"] is None else _num(value_of(g["metrics"])) for g in groups.values()]
            rows.append([esc(title), *cells])
        parts.append(f"<h3>by {esc(column)}</h3>" + _table(header, rows, css_class="groups"))
    note = "Groups too small to measure show every metric as undefined; images missing the column are in no group."
    return _Section("subgroups", "Subgroups", "".join(parts) + f'<p class="note">{esc(note)}</p>')


def _threshold_text(manifest: Mapping[str, Any]) -> str:
    if manifest.get("task") == "multiclass":
        return "none: the predicted class is the one with the highest probability"
    method = manifest.get("config", {}).get("train", {}).get("threshold_method", UNDEFINED)
    how = {
        "youden": "maximising sensitivity + specificity - 1 (Youden's J)",
        "sensitivity": "the highest threshold that keeps sensitivity at or above 0.9",
    }.get(method, str(method))
    labels = manifest.get("labels", [])
    shown = ", ".join(f"{name} {t:.3f}" for name, t in zip(labels, manifest.get("thresholds") or [], strict=False))
    return (
        f"per label, chosen on the run's validation split by {how}; 0.5 where the validation split had "
        f"no positive or no negative. {shown}"
    )


def _model_card(manifest: Mapping[str, Any], metrics: Mapping[str, Any]) -> _Section:
    model = manifest.get("model", {})
    prep = manifest.get("preprocessing", {})
    data = manifest.get("data", {})
    versions = manifest.get("versions", {})
    head = model.get("head", UNDEFINED)
    if model.get("head_hidden"):
        head = f"{head} {model['head_hidden']}"
    pairs = [
        ("model", esc(f"{model.get('name', UNDEFINED)} ({head} head, {model.get('num_classes')} outputs)")),
        ("task", esc(manifest.get("task", UNDEFINED))),
        ("labels", esc(", ".join(manifest.get("labels", [])))),
        ("trained on", esc(f"{data.get('source', UNDEFINED)} ({data.get('kind', UNDEFINED)})")),
        (
            "preprocessing",
            esc(
                f"{prep.get('channels')} channel(s), {prep.get('resize', 'squash')}-resized to "
                f"{prep.get('image_size')} px, normalised with mean {prep.get('mean')} and std {prep.get('std')}"
            ),
        ),
        ("checkpoint created", esc(manifest.get("created", UNDEFINED))),
        ("best epoch", esc(manifest.get("epoch", UNDEFINED))),
        (
            "validation metrics",
            esc(", ".join(f"{k} {v:.4f}" for k, v in (manifest.get("metrics") or {}).items() if _is_number(v))),
        ),
        ("operating thresholds", esc(_threshold_text(manifest))),
        ("temperature", esc(f"{manifest.get('temperature', 1.0):.4f}, fitted on the validation split")),
        ("versions", esc(", ".join(f"{k} {v}" for k, v in versions.items()) or UNDEFINED)),
        ("evaluated", esc((metrics.get("evaluated_on") or {}).get("date", UNDEFINED))),
        ("intended use", esc(INTENDED_USE)),
    ]
    config = manifest.get("config")
    body = key_values(pairs)
    if config:
        shown = esc(json.dumps(config, indent=2))
        body += f"<details><summary>training configuration</summary><pre>{shown}</pre></details>"
    return _Section("model-card", "Model card", body)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and np.isfinite(value)


def render_report(metrics: Mapping[str, Any], inputs: ReportInputs) -> str:
    """The whole page as one HTML string."""
    where = metrics.get("evaluated_on") or {}
    sections = [
        _summary(metrics, inputs),
        _per_label(metrics),
        _baseline(metrics),
        _curves(metrics, inputs),
        _calibration(metrics, inputs),
        _subgroups(metrics),
        *(_Section(*section) for section in inputs.sections),
    ]
    if inputs.samples_png is not None:
        caption = "Sample images as the model saw them: true vs predicted labels (green right, red wrong)."
        sections.append(_Section("samples", "Samples", figure_html(inputs.samples_png, caption, "sample predictions")))
    if inputs.history is not None and len(inputs.history):
        png = plots.plot_history(inputs.history)
        figure = figure_html(png, "Training loss and validation metrics per epoch", "training curves")
        sections.append(_Section("training", "Training", figure))
    sections.append(_model_card(inputs.manifest, metrics))
    shown = [section for section in sections if section is not None]
    nav = "".join(f'<a href="#{section.anchor}">{esc(section.title)}</a>' for section in shown)
    title = f"medlens evaluation: {inputs.manifest.get('model', {}).get('name', 'model')} on {where.get('source', '')}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>Evaluation report</h1><p class="sub">{esc(title)}</p>'
        f'<div class="notice" role="note">{esc(RESEARCH_NOTICE)}</div><nav>{nav}</nav>'
        + "".join(section.html() for section in shown)
        + f'<footer><div class="notice">{esc(RESEARCH_NOTICE)}</div></footer></main></body></html>\n'
    )


def write_report(out_dir: str | Path, metrics: Mapping[str, Any], inputs: ReportInputs) -> Path:
    """Write ``out_dir/report.html`` (atomically) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    write_atomic(path, render_report(metrics, inputs))
    return path
