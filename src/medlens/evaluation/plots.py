"""Pictures of the numbers: every function takes computed values and returns PNG bytes.

Each also writes the PNG to ``out`` when given. Nothing here computes a metric: curves come from
:mod:`medlens.evaluation.curves`, calibration bins from :func:`metrics.reliability_curve`, confusion
matrices from :func:`metrics.multiclass_metrics`. matplotlib is imported lazily, with the Agg backend, so
nothing here needs a screen.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlens.evaluation.curves import PrCurve, RocCurve
from medlens.evaluation.metrics import ReliabilityCurve

DPI = 110
PANEL_COLUMNS = 4
CORRECT_COLOUR = "#1a7f37"
WRONG_COLOUR = "#c62828"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, out: str | Path | None) -> bytes:
    """The figure as PNG bytes (written to ``out`` too when given); the figure is closed."""
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = buffer.getvalue()
    if out is not None:
        Path(out).write_bytes(data)
    return data


def _styles(n: int) -> list[dict[str, Any]]:
    """Line colour and style per curve: the ten tab10 colours, solid, then again dashed, then dotted."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [{"color": cmap(i % 10), "linestyle": ("-", "--", ":")[(i // 10) % 3]} for i in range(n)]


def _panel_grid(n: int, size: float = 3.0) -> tuple[Any, list[Any]]:
    """A figure of ``n`` small square panels, PANEL_COLUMNS to a row; spare panels hidden."""
    plt = _pyplot()
    cols = min(PANEL_COLUMNS, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def plot_history(history: pd.DataFrame, out: str | Path | None = None) -> bytes:
    """Training loss and validation metrics per epoch (the seeds' accuracy/loss curves)."""
    plt = _pyplot()
    metrics = [c for c in ("val_auc", "val_accuracy") if c in history and history[c].notna().any()]
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.5 * (1 + len(metrics)), 3.4), squeeze=False)
    epochs = history["epoch"] + 1
    loss_ax = axes[0, 0]
    loss_ax.plot(epochs, history["train_loss"], marker="o", label="train")
    loss_ax.plot(epochs, history["val_loss"], marker="o", label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()
    for ax, column in zip(axes[0, 1:], metrics, strict=True):
        ax.plot(epochs, history[column], marker="o", color="tab:green")
        ax.set(title=column.replace("val_", "validation "), xlabel="epoch", ylim=(0, 1.02))
    last = int(epochs.max())
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.set_xticks(range(1, last + 1, max(1, math.ceil(last / 10))))
        ax.set_xlim(0.5, last + 0.5)
    fig.tight_layout()
    return _finish(fig, out)


def _square_unit_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, aspect="equal")
    ax.grid(alpha=0.3)


def plot_roc(
    curves: Sequence[RocCurve],
    out: str | Path | None = None,
    operating_points: Mapping[str, tuple[float, float]] | None = None,
) -> bytes:
    """Every label's ROC curve on one plot; the legend gives each AUC ("undefined" ones are not drawn).

    ``operating_points`` maps a label to its (FPR, TPR) at the operating threshold, marked with a dot.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.8, 5.6))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for curve, style in zip(curves, _styles(len(curves)), strict=True):
        name = f"{curve.label}  AUC {_fmt(curve.auc)}"
        if not curve.defined:
            ax.plot([], [], color="0.75", linestyle=":", label=name)
            continue
        ax.plot(curve.fpr, curve.tpr, linewidth=1.6, label=name, **style)
        point = (operating_points or {}).get(curve.label)
        if point is not None:
            ax.plot(*point, marker="o", color=style["color"], markersize=5)
    _square_unit_axes(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)")
    ax.set_title("ROC curves")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig, out)


def plot_roc_bands(
    curves: Sequence[RocCurve],
    out: str | Path | None = None,
    operating_points: Mapping[str, tuple[float, float]] | None = None,
    ci_level: float = 0.95,
) -> bytes:
    """One panel per label: the ROC curve, its patient-bootstrap band and the operating point."""
    fig, axes = _panel_grid(len(curves))
    for ax, curve in zip(axes, curves, strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        if curve.defined:
            if curve.tpr_lo is not None and curve.tpr_hi is not None:
                ax.fill_between(
                    curve.grid,
                    curve.tpr_lo,
                    curve.tpr_hi,
                    color="tab:blue",
                    alpha=0.2,
                    linewidth=0,
                    label=f"{ci_level:.0%} band",
                )
            ax.plot(curve.fpr, curve.tpr, color="tab:blue", linewidth=1.6)
            point = (operating_points or {}).get(curve.label)
            if point is not None:
                ax.plot(*point, marker="o", color="tab:red", markersize=5, label="operating point")
        else:
            ax.text(
                0.5,
                0.5,
                f"AUC undefined\n{curve.n_positive} positive, {curve.n_negative} negative",
                ha="center",
                va="center",
                fontsize=9,
                color="0.35",
            )
        _square_unit_axes(ax, "FPR", "TPR")
        ax.set_title(f"{curve.label}\nAUC {_fmt(curve.auc)}  (n+ {curve.n_positive})", fontsize=9)
        ax.tick_params(labelsize=7)
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _finish(fig, out)


def plot_pr(curves: Sequence[PrCurve], out: str | Path | None = None) -> bytes:
    """Every label's precision-recall curve on one plot; the legend gives AP and prevalence."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.8, 5.6))
    for curve, style in zip(curves, _styles(len(curves)), strict=True):
        prevalence = "undefined" if curve.prevalence is None else f"{curve.prevalence:.2f}"
        name = f"{curve.label}  AP {_fmt(curve.ap)}  (prev. {prevalence})"
        if not curve.defined:
            ax.plot([], [], color="0.75", linestyle=":", label=name)
            continue
        ax.plot(curve.recall, curve.precision, linewidth=1.6, label=name, drawstyle="steps-post", **style)
    _square_unit_axes(ax, "recall (sensitivity)", "precision (PPV)")
    ax.set_title("Precision-recall curves")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig, out)


def plot_confusion(
    counts: Sequence[Sequence[int]],
    normalized: Sequence[Sequence[float | None]],
    labels: Sequence[str],
    out: str | Path | None = None,
) -> bytes:
    """Confusion matrix heatmaps side by side: counts, and each row divided by its support.

    Rows are the true class, columns the predicted one; a class without support has an empty row.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    count_matrix = np.asarray(counts, dtype=np.float64)
    share_matrix = np.array([[np.nan if v is None else v for v in row] for row in normalized], dtype=np.float64)
    k = len(labels)
    side = max(4.0, 0.55 * k + 2.2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    panels = (
        (axes[0], count_matrix, "counts", "{:.0f}", None),
        (axes[1], share_matrix, "row-normalised (recall on the diagonal)", "{:.2f}", 1.0),
    )
    for ax, matrix, title, pattern, vmax in panels:
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="Blues", vmin=0, vmax=vmax)
        top = np.nanmax(matrix) if np.isfinite(matrix).any() else 1.0
        for (i, j), value in np.ndenumerate(matrix):
            text = "–" if not np.isfinite(value) else pattern.format(value)
            dark = np.isfinite(value) and value > 0.6 * (vmax or top)
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        ticks = MaxNLocator(integer=True) if vmax is None else None
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=ticks)
    fig.tight_layout()
    return _finish(fig, out)


def plot_reliability(curves: Mapping[str, ReliabilityCurve], out: str | Path | None = None) -> bytes:
    """Reliability diagram: observed frequency vs mean confidence per bin, one line per named curve
    (e.g. before and after temperature scaling), with the bin counts below."""
    plt = _pyplot()
    fig, (ax, counts_ax) = plt.subplots(2, 1, figsize=(5.6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    width = 1.0 / max(len(next(iter(curves.values())).centres), 1) if curves else 0.1
    for i, ((name, curve), style) in enumerate(zip(curves.items(), _styles(len(curves)), strict=True)):
        colour = style["color"]
        filled = curve.counts > 0
        ax.plot(
            curve.confidence[filled],
            curve.accuracy[filled],
            marker="o",
            markersize=4,
            color=colour,
            label=f"{name}  ECE {_fmt(curve.ece)}",
        )
        share = width / max(len(curves), 1)
        counts_ax.bar(curve.centres - width / 2 + share * (i + 0.5), curve.counts, width=share, color=colour, alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="observed frequency", title="Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    counts_ax.set(xlabel="confidence (predicted probability)", ylabel="count")
    counts_ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, out)


def plot_samples(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    correct: Sequence[bool],
    out: str | Path | None = None,
    columns: int = 4,
) -> bytes:
    """A grid of images as the model saw them, each captioned (true vs predicted), green when right."""
    plt = _pyplot()
    n = len(images)
    if len(captions) != n or len(correct) != n:
        raise ValueError(f"{n} images need as many captions and flags; got {len(captions)} and {len(correct)}")
    cols = min(columns, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption, right in zip(axes.ravel(), images, captions, correct, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
        ax.set_title(caption, fontsize=8, color=CORRECT_COLOUR if right else WRONG_COLOUR)
    fig.tight_layout()
    return _finish(fig, out)


def plot_fold_histories(histories: Mapping[str, pd.DataFrame], out: str | Path | None = None) -> bytes:
    """Cross-validation curves: loss (train solid, validation dashed) and validation metrics, a colour per fold."""
    plt = _pyplot()
    frames = list(histories.values())
    metrics = [c for c in ("val_auc", "val_accuracy") if any(c in h and h[c].notna().any() for h in frames)]
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.5 * (1 + len(metrics)), 3.4), squeeze=False)
    loss_ax = axes[0, 0]
    for (name, history), style in zip(histories.items(), _styles(len(histories)), strict=True):
        epochs = history["epoch"] + 1
        shared = {"color": style["color"], "marker": "o", "markersize": 3}
        loss_ax.plot(epochs, history["train_loss"], **shared, label=f"{name} train")
        loss_ax.plot(epochs, history["val_loss"], **shared, linestyle="--", label=f"{name} validation")
        for ax, column in zip(axes[0, 1:], metrics, strict=True):
            ax.plot(epochs, history[column], **shared, label=name)
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend(fontsize=7, ncol=2)
    for ax, column in zip(axes[0, 1:], metrics, strict=True):
        ax.set(title=column.replace("val_", "validation "), xlabel="epoch", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _finish(fig, out)


def plot_search(
    numbers: Sequence[int],
    values: Sequence[float],
    pruned: Sequence[bool],
    best_so_far: Sequence[float],
    out: str | Path | None = None,
) -> bytes:
    """A hyperparameter search: each trial's objective (pruned ones at their last report) and the best so far."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    done = [i for i, p in enumerate(pruned) if not p]
    stopped = [i for i, p in enumerate(pruned) if p]
    ax.scatter([numbers[i] for i in done], [values[i] for i in done], color="tab:blue", label="trial")
    ax.scatter(
        [numbers[i] for i in stopped], [values[i] for i in stopped], color="tab:gray", marker="x", label="pruned"
    )
    ax.step(numbers, best_so_far, where="post", color="tab:green", label="best so far")
    ax.set(xlabel="trial", ylabel="objective")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, out)


def plot_groups(groups: Mapping[str, Any], out: str | Path | None = None) -> bytes:
    """One bar per group of each column (``evaluation.audit.group_performance``) with its CI, over the pooled
    value and its band; groups whose interval lies wholly below the pooled one are drawn red."""
    plt = _pyplot()
    bars = [(f"{column}: {name}", g) for column, found in groups["columns"].items() for name, g in found.items()]
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * max(len(bars), 1)))
    pooled = groups["pooled"]
    if pooled["ci"]:
        ax.axvspan(*pooled["ci"], color="0.85", label=f"pooled {_fmt(pooled['value'])} and its CI")
    if pooled["value"] is not None:
        ax.axvline(pooled["value"], color="0.4", linewidth=1)
    for k, (_, g) in enumerate(bars):
        if g["value"] is None:
            ax.text(0.01, k, "too few images", va="center", fontsize=8, color="0.5")
            continue
        colour = WRONG_COLOUR if g["below"] else "#0b57d0"
        error = None
        if g["ci"]:
            error = [[g["value"] - g["ci"][0]], [g["ci"][1] - g["value"]]]
        ax.barh(k, g["value"], color=colour, alpha=0.75, xerr=error, capsize=3)
    ax.set_yticks(range(len(bars)), [f"{name} (n={g['n_images']})" for name, g in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.02), xlabel=groups["metric"].replace("_", " "))
    if pooled["ci"]:  # the band is the one labelled artist
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _finish(fig, out)
