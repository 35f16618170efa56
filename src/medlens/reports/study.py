"""The facts of a per-study report: what the model measured on one image, and the sentences they make.

Nothing is invented: every number comes from the checkpoint (thresholds, validation operating points, the
model card) or from this image (probabilities, the X-ray guard, heatmap peaks); the sentences are fixed
templates over those numbers. :mod:`medlens.reports.study_page` renders a :class:`Study` as HTML.

Where a heatmap points is said by zone: the image is cut into thirds each way, and the zone is the
vertical third (upper, middle, lower) and the horizontal third (left, central, right) holding the map's
maximum. Sides are the image's; for frontal views (PA, AP), displayed as convention has it, the image's
left is the patient's right, so the patient's side is stated too. No patient identifier is ever taken
from a file: only the ``patient_label`` a user passes explicitly appears in a report.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from medlens.data.readers import DEFAULT_MAX_PIXELS, load_image
from medlens.explain.overlay import heatmap_png
from medlens.inference import NOT_RECORDED, Heatmap, Model, Problem, model_card
from medlens.ood import OodResult, assess_upload

VERTICAL = ("upper", "middle", "lower")
HORIZONTAL = ("left", "central", "right")
FRONTAL_VIEWS = frozenset({"PA", "AP"})
"""Views whose conventional display puts the patient's right on the image's left."""
DISPLAY_MAX_SIDE = 768
"""The image and its heatmaps are embedded at most this many pixels on their longest side."""
FACE_TOP_K = 5
RESEARCH_USE = (
    "For research, not diagnosis. This report was written by a machine-learning model that has not been "
    "cleared or approved as a medical device; it must not guide the care of any patient."
)
GENETICIST_NOTE = (
    "This is a ranking of syndromes whose facial features the photo resembles, to discuss with a clinical "
    "geneticist; it is not a diagnosis."
)


@dataclass(frozen=True)
class Zone:
    """Where a heatmap peaks: its vertical and horizontal third, and the peak as fractions of the image."""

    vertical: str
    horizontal: str
    peak: tuple[float, float]
    """(row, column) of the map's maximum, as fractions of the image's height and width."""

    def patient_side(self, view: str | None) -> str | None:
        """The patient's side under the image side, for frontal views; None otherwise or in the centre."""
        if view not in FRONTAL_VIEWS or self.horizontal == "central":
            return None
        return "right" if self.horizontal == "left" else "left"

    def describe(self, view: str | None = None) -> str:
        """``"the lower right zone of the image (the patient's left)"``; no patient side for unknown views."""
        text = f"the {self.vertical} {self.horizontal} zone of the image"
        side = self.patient_side(view)
        return f"{text} (the patient's {side})" if side else text


def heatmap_zone(heatmap: np.ndarray) -> Zone | None:
    """The zone of a map's maximum (any size: the model saw the whole image squashed); None if it is flat."""
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"a heatmap is a non-empty 2-D array, got shape {heatmap.shape}")
    heat = np.nan_to_num(heatmap.astype(np.float64), nan=0.0)
    if heat.max() <= heat.min():
        return None
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    height, width = heat.shape
    peak = ((row + 0.5) / height, (col + 0.5) / width)
    return Zone(VERTICAL[int(peak[0] * 3)], HORIZONTAL[int(peak[1] * 3)], peak)


@dataclass(frozen=True)
class ValidationPoint:
    """A label's sensitivity and specificity at its threshold on the run's validation split (None: undefined)."""

    sensitivity: float | None
    specificity: float | None
    n_positive: int
    n_known: int


@dataclass(frozen=True)
class FindingFacts:
    """One label on one image."""

    label: str
    probability: float
    positive: bool
    threshold: float | None = None
    """None where the task has no thresholds (multi-class, faces)."""
    validation: ValidationPoint | None = None
    """None when the checkpoint did not record it."""
    zone: Zone | None = None
    heatmap_png: bytes | None = None


@dataclass
class Study:
    """Everything one report says, all measured; ``findings`` are ranked, most probable first."""

    inputs: str
    """What the model was made for: ``chest-xray``, ``face-photo`` or ``image``."""
    task: str
    findings: list[FindingFacts]
    image_png: bytes
    model_card: list[tuple[str, str]]
    method: str
    view: str | None = None
    ood: OodResult | None = None
    no_answer: Problem | None = None
    """Why the model could not answer (a face model: no face found); None when it could."""
    patient_label: str | None = None
    written: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))

    @property
    def positives(self) -> list[FindingFacts]:
        return [f for f in self.findings if f.positive]

    @property
    def findings_shown(self) -> bool:
        """False when the X-ray guard flagged the image or the model could not answer: findings are withheld."""
        return not (self.ood is not None and self.ood.flag) and self.no_answer is None


# ---------------------------------------------------------------------------------------------- sentences


def finding_sentence(finding: FindingFacts, view: str | None, task: str) -> str:
    """The plain-language sentence of a positive finding (multi-class: of the predicted class)."""
    name = finding.label.replace("_", " ")
    where = f", strongest in {finding.zone.describe(view)}" if finding.zone else ""
    if task == "multiclass":
        return f"The most probable class is {name}, with probability {finding.probability:.2f}{where}."
    return (
        f"Signs consistent with {name}{where}; the model's probability is {finding.probability:.2f}, "
        f"above its threshold of {finding.threshold:.2f}."
    )


def summary_sentences(study: Study) -> list[tuple[str | None, str]]:
    """What the report says first, in order: (the finding a sentence is about, or None; the sentence)."""
    if study.no_answer is not None:
        return [(None, f"No finding can be given: {study.no_answer.detail}.")]
    if study.ood is not None and study.ood.flag:
        return [
            (None, f"This image does not look like a chest X-ray: {'; '.join(study.ood.reasons)}."),
            (
                None,
                "The model's findings are not shown: it was not made for such images, so they would not be reliable.",
            ),
        ]
    if study.inputs == "face-photo":
        ranked = ", ".join(f"{f.label} ({f.probability:.2f})" for f in study.findings[:FACE_TOP_K])
        return [
            (None, f"The {FACE_TOP_K} most similar syndromes, most probable first: {ranked}."),
            (None, GENETICIST_NOTE),
        ]
    sentences: list[tuple[str | None, str]] = [
        (f.label, finding_sentence(f, study.view, study.task)) for f in study.positives
    ]
    if not sentences:
        top = study.findings[0]
        sentences = [
            (
                None,
                f"No finding is above its threshold. The highest probability is {top.probability:.2f}, for "
                f"{top.label.replace('_', ' ')} (threshold {top.threshold:.2f}).",
            )
        ]
    if any(f.zone is None and f.heatmap_png is not None for f in study.positives):
        sentences.append((None, "Where a sentence names no zone, the heatmap singles out none: it is flat."))
    return sentences


def validation_text(point: ValidationPoint | None) -> str:
    """``"sensitivity 0.81, specificity 0.77 (32 of 210 validation images positive)"``, or why there is none."""
    if point is None:
        return NOT_RECORDED
    shown = [
        f"{name} {'undefined' if value is None else f'{value:.2f}'}"
        for name, value in (("sensitivity", point.sensitivity), ("specificity", point.specificity))
    ]
    return f"{', '.join(shown)} ({point.n_positive} of {point.n_known} validation images positive)"


# ---------------------------------------------------------------------------------------------- facts


def study_of(
    model: Model,
    data: bytes,
    *,
    view: str | None = None,
    patient_label: str | None = None,
    name: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    method: str | None = None,
    xray_guard: bool | None = None,
) -> Study:
    """Read, check, predict and explain one image file's ``data`` through any checkpoint.

    Heatmaps (``method``, default the model's first: Grad-CAM for networks, occlusion for probes) are drawn
    for the positive findings (multi-class: the predicted class), none when the X-ray guard flags the image
    (it applies to models of chest X-rays). A DICOM's ViewPosition wins over ``view`` (the view of images
    that do not say). An image the model cannot answer for (a photo without a face) gets a study that says
    why and holds no findings. ``xray_guard``: None applies the guard as the model's inputs say.
    """
    loaded = load_image(data, channels=model.channels, max_pixels=max_pixels, name=name)  # type: ignore[arg-type]
    guarded = model.inputs == "chest-xray" if xray_guard is None else xray_guard
    ood = assess_upload(loaded) if guarded else None
    backdrop = _display_copy(loaded.pixels)
    prepared = model.prepare(loaded.pixels)
    scores = model.logits([prepared])
    problem = scores.problems[0]
    method = method or model.cam_methods[0]
    study = Study(
        inputs=model.inputs,
        task=model.task,
        findings=[],
        image_png=_png(backdrop),
        model_card=model_card(model),
        method=method,
        view=_view(loaded.dicom.get("ViewPosition")) or _view(view),
        ood=ood,
        no_answer=problem,
        patient_label=patient_label,
    )
    if problem is None:
        explain = not (ood and ood.flag)
        study.findings = _findings(model, loaded.pixels, prepared, scores.values, backdrop, method, explain)
    return study


def _findings(
    model: Model,
    pixels: np.ndarray,
    prepared: object,
    logits: np.ndarray,
    backdrop: np.ndarray,
    method: str,
    explain: bool,
) -> list[FindingFacts]:
    """Every label, most probable first; with ``explain``, the positive ones with their heatmap."""
    probs = model.probabilities(logits)[0]
    positives = set(model.positives(probs))
    order = [int(j) for j in np.argsort(-probs, kind="stable")]
    shown = [j for j in order if explain and model.labels[j] in positives]
    maps = {model.labels.index(h.label): h for h in model.heatmaps(pixels, shown, method, prepared)} if shown else {}
    points = operating_points(model.manifest)
    findings = []
    for j in order:
        label = model.labels[j]
        heatmap = maps.get(j)
        # A CAM covers the image, so its peak names a zone; an occlusion map covers the embedder's frame.
        zone = heatmap_zone(heatmap.map) if heatmap is not None and heatmap.marks is None else None
        findings.append(
            FindingFacts(
                label=label,
                probability=float(probs[j]),
                positive=label in positives,
                threshold=None if model.task == "multiclass" else float(model.thresholds[j]),
                validation=points.get(label),
                zone=zone,
                heatmap_png=None if heatmap is None else heatmap_picture(heatmap, backdrop),
            )
        )
    return findings


def heatmap_picture(heatmap: Heatmap, backdrop: np.ndarray) -> bytes:
    """A heatmap as PNG: a CAM over ``backdrop`` (the image, or a display copy of it); an occlusion map over the
    face chip it was computed on. What a report and the server show."""
    return heatmap_png(heatmap.map, backdrop if heatmap.marks is None else heatmap.backdrop, heatmap.marks)


def operating_points(manifest: Mapping[str, Any]) -> dict[str, ValidationPoint]:
    """Per label, the validation operating point the checkpoint recorded; {} for checkpoints without them."""
    return {label: ValidationPoint(**point) for label, point in (manifest.get("operating_points") or {}).items()}


def _view(value: object) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text or None


def _display_copy(pixels: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """``pixels`` (float [0, 1]) shrunk to at most ``max_side`` on the longest side, still float [0, 1]."""
    image = Image.fromarray(np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8))
    image.thumbnail((max_side, max_side), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255.0


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
