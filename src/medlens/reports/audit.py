"""audit.html: the shortcut audit's verdicts, one line per check, then the numbers and pictures behind them.

Self-contained like report.html (whose CSS, tables and figure pieces it shares): inline CSS, figures as
data URIs, every text from data HTML-escaped. Also the short per-source section every evaluation report
carries (:func:`evaluation_section`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medlens.data import regions
from medlens.evaluation import plots
from medlens.explain.overlay import blend
from medlens.io import write_atomic
from medlens.reports.evaluation import CSS, RESEARCH_NOTICE, _ci, _num, _table, esc, figure_html, section_html

AUDIT_REPORT = "audit.html"
_SHOWN_SIDE = 256
AUDIT_HINT = (
    "medlens audit RUN --out DIR adds the other checks: whether the source can be told from the model's "
    "embeddings and from the pixels, how much covering the image's border or its burned-in text moves the "
    "scores, and how much of the heatmap lies inside the lungs."
)


def _verdicts(numbers: Mapping[str, Any]) -> str:
    items = []
    for verdict in numbers["verdicts"]:
        colour = "#b42318" if verdict["flagged"] else "#1a7f37"
        items.append(f'<li><b style="color:{colour}">{esc(verdict["check"])}</b>: {esc(verdict["line"])}</li>')
    return f"<ul>{''.join(items)}</ul>"


def groups_html(groups: Mapping[str, Any]) -> str:
    """The per-group table (and its chart) of ``group_performance``."""
    if not groups["columns"]:
        return '<p class="note">No column with two groups (source, site, view, scanner, sex, age) in this data.</p>'
    level = f"{groups.get('ci_level', 0.95):.0%} CI"
    rows = [["<b>pooled</b>", str(groups["pooled"]["n_images"]), str(groups["pooled"]["n_patients"]),
             _num(groups["pooled"]["value"]), _ci(groups["pooled"]["ci"]), ""]]  # fmt: skip
    for column, found in groups["columns"].items():
        for name, g in found.items():
            below = '<b style="color:#b42318">below pooled</b>' if g["below"] else ""
            rows.append([esc(f"{column}: {name}"), str(g["n_images"]), str(g["n_patients"]), _num(g["value"]),
                         _ci(g["ci"]), below])  # fmt: skip
    header = ["group", "images", "patients", esc(groups["metric"].replace("_", " ")), level, ""]
    chart = figure_html(plots.plot_groups(groups), f"{groups['metric']} per group with its {level}", "per-group bars")
    return _table(header, rows) + chart


def _source_html(source: Mapping[str, Any]) -> str:
    if source.get("column") is None:
        return '<p class="note">No source column (source, site, source_repo, scanner): not checked.</p>'
    rows = []
    for name, probe in (("model's embeddings", source["from_embeddings"]), ("pixels (24 x 24)", source["from_pixels"])):
        rows.append([esc(name), _num(probe["balanced_accuracy"]), _num(probe["chance"]), str(probe["n_images"]),
                     str(probe["n_sources"]), str(probe["folds"])])  # fmt: skip
    dependence = source["label_dependence"]
    table = _table(["told from", "balanced accuracy", "chance", "images", "sources", "folds"], rows)
    note = (f"Source column: {source['column']}. Label vs source: Cramér's V {_num(dependence['cramers_v'])}, "
            f"mutual information {_num(dependence['mutual_information_bits'])} bits. A standardised ridge "
            "classifier in a patient-grouped stratified K-fold; sources with one patient are left out.")  # fmt: skip
    return table + f'<p class="note">{esc(note)}</p>'


def _change_row(title: str, change: Mapping[str, Any]) -> list[str]:
    return [esc(title), _num(change["mean_abs_change"]), _num(change["flip_share"]), _num(-change["max_auc_drop"])]


def _border_html(numbers: Mapping[str, Any]) -> str:
    rows = [_change_row(f"outer {c['width_share']:.0%} ({c['width_px']} px), {c['mode']}", c)
            for c in numbers["border"]["covers"]]  # fmt: skip
    text = numbers["text"]
    if text["change"] is not None:
        rows.append(_change_row(f"burned-in text on {text['n_with_text']} images, inpainted", text["change"]))
    header = ["covered", "mean |change|", "decisions flipped", "largest AUC change"]
    note = "Covered on the model-size image. Text is found by a heuristic (docs/audit.md says what it misses)."
    return _table(header, rows) + f'<p class="note">{esc(note)}</p>'


def _grid(pictures: Sequence[Mapping[str, Any]]) -> bytes:
    images, captions, flags = [], [], []
    for picture in pictures:
        prepared = np.asarray(picture["prepared"])
        band = regions.border_band(prepared.shape, regions.border_widths(prepared.shape)[-1])
        heat = picture["heatmap"]
        backdrop = heat.backdrop
        scale = _SHOWN_SIDE / max(backdrop.shape[:2])
        if scale < 1:
            size = (round(backdrop.shape[1] * scale), round(backdrop.shape[0] * scale))
            backdrop = cv2.resize(backdrop, size, interpolation=cv2.INTER_AREA)
        images += [prepared, regions.cover(prepared, band, "blank"), blend(backdrop, heat.map)]
        captions += [picture["image"][:28], f"border blanked: moved {picture['moved']:.2f}",
                     f"{picture['label'][:20]}: {picture['energy']:.0%} inside"]  # fmt: skip
        flags += [True, picture["moved"] < 0.1, picture["energy"] >= 0.5]
    return plots.plot_samples(images, captions, flags, columns=3)


def render_audit(numbers: Mapping[str, Any], pictures: Sequence[Mapping[str, Any]]) -> str:
    where = numbers["evaluated_on"]
    evidence = numbers["evidence"]
    parts = [
        section_html("verdicts", "Verdicts", _verdicts(numbers)),
        section_html("groups", "Performance per group", groups_html(numbers["groups"])),
        section_html("source", "Source predictability", _source_html(numbers["source"])),
        section_html("border", "Border and marker sensitivity", _border_html(numbers)),
    ]
    note = (f"{evidence['method']} heatmap of the top class (multi-label: the highest label) on "
            f"{evidence['n_images']} images; region: {evidence['region']}. Energy inside "
            f"{_num(evidence['energy_inside'])}, region's share of the image {_num(evidence['area_share'])}.")
    if pictures:
        caption = ("The images whose scores moved most when the border was covered: as the model sees them, with "
                   "the widest band blanked, and the heatmap with its share of energy inside the region.")
        note_html = f'<p class="note">{esc(note)}</p>' + figure_html(_grid(pictures), caption, "images that moved most")
    else:
        note_html = f'<p class="note">{esc(note)}</p>'
    parts.append(section_html("evidence", "Where the evidence lies", note_html))
    title = f"medlens audit: {numbers['model']} on {where['description']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>Shortcut audit</h1><p class="sub">{esc(title)}</p>'
        f'<div class="notice" role="note">{esc(RESEARCH_NOTICE)}</div>' + "".join(parts) + "</main></body></html>\n"
    )


def write_audit_report(out: str | Path, numbers: Mapping[str, Any], pictures: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(out) / AUDIT_REPORT
    write_atomic(path, render_audit(numbers, pictures))
    return path


def evaluation_section(groups: Mapping[str, Any] | None, verdict: str | None) -> tuple[str, str, str]:
    """(anchor, title, body) of the evaluation report's shortcut section: per-source performance, the hint."""
    if groups is None:
        body = '<p class="note">No source column (source, site, source_repo, scanner) in this data.</p>'
    else:
        body = f"<p>{esc(verdict or '')}</p>" + groups_html(groups)
    return "shortcuts", "Shortcuts: performance per source", body + f'<p class="note">{esc(AUDIT_HINT)}</p>'
