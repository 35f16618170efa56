"""A :class:`~medlens.reports.study.Study` as one self-contained HTML page, and as PDF where Chromium is.

The page only displays what the study holds: inline CSS, the image and heatmaps as base64 PNG, no script
and no external resource, so it can be mailed or archived alone. All text is HTML-escaped. PDFs are printed
by headless Chromium (``scripts/setup-system.sh`` installs it); without it the HTML stands alone.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medlens.io import write_atomic
from medlens.reports.evaluation import CSS, esc, figure_html, key_values, section_html
from medlens.reports.study import (
    FACE_TOP_K,
    RESEARCH_USE,
    FindingFacts,
    Study,
    summary_sentences,
    validation_text,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.html"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-pdf-header-footer",
)
PDF_SECONDS = 120

STUDY_CSS = """
ul.sentences { font-size: 15px; padding-left: 20px; }
ul.sentences li { margin: 6px 0; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; }
.figures figure { margin: 0; width: 340px; break-inside: avoid; }
.figures img { width: 100%; }
tr.positive td { font-weight: 600; }
.warning { border: 2px solid #b54708; background: #fffaeb; color: #7a2e0e; padding: 10px 14px;
           border-radius: 6px; margin: 14px 0; }
@media print { main { padding: 0; } h2 { break-after: avoid; } }
"""


@dataclass(frozen=True)
class IndexEntry:
    """One image's line in the index: its report (None if unreadable) and what the report says in brief."""

    image: str
    report: str | None
    pdf: str | None
    summary: str


def render_study(study: Study) -> str:
    """The whole report as one HTML string."""
    who = f" · patient: {esc(study.patient_label)}" if study.patient_label else ""
    model = dict(study.model_card).get("model", "")
    sections = [
        section_html("summary", "Summary", _summary(study)),
        section_html("images", "Image and heatmaps", _figures(study)),
    ]
    if study.findings_shown:
        sections.append(section_html("findings", _findings_title(study), _findings_table(study)))
    sections += [
        section_html("model-card", "Model card", key_values((key, esc(value)) for key, value in study.model_card)),
        section_html("reading", "How to read this report", _reading_notes(study)),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>medlens study report</title><style>{CSS}{STUDY_CSS}</style></head><body><main>"
        f'<h1>Study report</h1><p class="sub">{esc(model)} · written {esc(study.written)}{who}</p>'
        f'<div class="notice" role="note">{esc(RESEARCH_USE)}</div>'
        + "".join(sections)
        + f'<footer><div class="notice">{esc(RESEARCH_USE)}</div></footer></main></body></html>\n'
    )


def render_index(entries: Sequence[IndexEntry]) -> str:
    """A page linking every report of a batch, with what each says in brief."""
    rows = []
    for entry in entries:
        report = f'<a href="{esc(entry.report)}">HTML</a>' if entry.report else ""
        pdf = f' · <a href="{esc(entry.pdf)}">PDF</a>' if entry.pdf else ""
        rows.append(f"<tr><td>{esc(entry.image)}</td><td>{report}{pdf}</td><td>{esc(entry.summary)}</td></tr>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>medlens study reports</title>'
        f"<style>{CSS}</style></head><body><main><h1>Study reports</h1>"
        f'<div class="notice" role="note">{esc(RESEARCH_USE)}</div>'
        "<table><thead><tr><th>image</th><th>report</th><th>in brief</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></main></body></html>\n"
    )


def brief(study: Study) -> str:
    """What a report says in a few words, for the index."""
    if study.no_answer is not None:
        return study.no_answer.summary
    if not study.findings_shown:
        return "not a chest X-ray: findings withheld"
    if study.inputs == "face-photo" or study.task == "multiclass":
        top = study.findings[0]
        return f"{top.label} ({top.probability:.2f})"
    return ", ".join(f"{f.label} ({f.probability:.2f})" for f in study.positives) or "no finding above threshold"


def write_study(study: Study, path: str | Path, chromium: str | None = None) -> tuple[Path, Path | None]:
    """Write the report to ``path`` (atomically) and, with ``chromium``, its PDF beside it (None if that failed)."""
    path = Path(path)
    write_atomic(path, render_study(study))
    if chromium is None:
        return path, None
    try:
        return path, print_pdf(path, path.with_suffix(".pdf"), chromium)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log.warning("%s: HTML written, PDF skipped (%s)", path, exc)
        return path, None


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def print_pdf(page: Path, pdf: Path, chromium: str) -> Path:
    """Print an HTML file to PDF with headless Chromium; RuntimeError with Chromium's complaint if it fails."""
    with tempfile.TemporaryDirectory(prefix="medlens-pdf-") as scratch:
        printed = Path(scratch) / "page.pdf"
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={Path(scratch) / 'profile'}",
            f"--print-to-pdf={printed}",
            page.resolve().as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=PDF_SECONDS, check=False)
        if result.returncode != 0 or not printed.is_file():
            raise RuntimeError(f"{chromium} could not print {page} to PDF: {result.stderr.strip()[-500:]}")
        write_atomic(pdf, printed.read_bytes())
    return pdf


# ---------------------------------------------------------------------------------------------- parts


def _summary(study: Study) -> str:
    items = [
        f'<li data-finding="{esc(label)}">{esc(text)}</li>' if label else f"<li>{esc(text)}</li>"
        for label, text in summary_sentences(study)
    ]
    warning = not study.findings_shown
    body = f'<ul class="sentences{" warning" if warning else ""}">{"".join(items)}</ul>'
    if study.inputs == "face-photo":
        return body
    view = f"View: {study.view}." if study.view else "View: not known, so sides are the image's only."
    return body + f'<p class="note">{esc(view)}</p>'


def _figures(study: Study) -> str:
    figures = [figure_html(study.image_png, "The image (shrunk for display).", "the image")]
    for finding in study.findings:
        if finding.heatmap_png is None:
            continue
        where = f", strongest in {finding.zone.describe(study.view)}" if finding.zone else ""
        caption = f"{finding.label}: {study.method} heatmap{where}."
        figures.append(figure_html(finding.heatmap_png, caption, f"{study.method} heatmap of {finding.label}"))
    return f'<div class="figures">{"".join(figures)}</div>'


def _findings_title(study: Study) -> str:
    if study.inputs == "face-photo":
        return f"The {FACE_TOP_K} most probable syndromes"
    return "All classes, ranked" if study.task == "multiclass" else "All findings"


def _findings_table(study: Study) -> str:
    if study.inputs == "face-photo" or study.task == "multiclass":
        shown = study.findings[:FACE_TOP_K] if study.inputs == "face-photo" else study.findings
        header = ["rank", "class", "probability"]
        rows = [(f, [str(rank), esc(f.label), f"{f.probability:.3f}"]) for rank, f in enumerate(shown, 1)]
    else:
        header = ["finding", "probability", "threshold", "positive", "validation at the threshold", "heatmap"]
        rows = [(f, _multilabel_row(f, study.view)) for f in study.findings]
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join(
        f'<tr{" class=positive" if f.positive else ""} data-label="{esc(f.label)}">'
        + "".join(f"<td>{cell}</td>" for cell in cells)
        + "</tr>"
        for f, cells in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _multilabel_row(finding: FindingFacts, view: str | None) -> list[str]:
    zone = finding.zone.describe(view) if finding.zone else ("flat" if finding.heatmap_png else "")
    return [
        esc(finding.label),
        f"{finding.probability:.3f}",
        f"{finding.threshold:.3f}",
        "yes" if finding.positive else "no",
        esc(validation_text(finding.validation)),
        esc(zone),
    ]


def _reading_notes(study: Study) -> str:
    if study.inputs == "face-photo":
        notes = [
            "Probabilities rank the classes the model was trained on; a syndrome it never saw cannot appear.",
            "The occlusion map shows where greying out part of the aligned face lowers the top class's "
            "probability most (red: most).",
        ]
    else:
        decision = (
            "The predicted class is the most probable one; the probabilities of all classes add up to 1."
            if study.task == "multiclass"
            else "A finding is called positive when its probability reaches the checkpoint's threshold, chosen "
            "on the validation split of its training run; sensitivity and specificity are measured there too."
        )
        notes = [
            decision,
            "Heatmaps show which parts of the image raised the score most (red: most). A zone is the third of "
            "the image, top to bottom and left to right, holding the heatmap's peak.",
            "Left and right are the image's as displayed; for frontal views (PA, AP) the patient's side, "
            "which is opposite, is given in brackets.",
        ]
    notes.append("No patient identifier is taken from the image file; only a label given by the user is shown.")
    return '<ul class="note">' + "".join(f"<li>{esc(note)}</li>" for note in notes) + "</ul>"
