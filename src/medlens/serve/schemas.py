"""What the HTTP API answers, as pydantic models: they make the OpenAPI document complete."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

RESEARCH_NOTICE = "For research only, not for diagnosis."

DicomValue = str | int | float | list[float] | None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer: a short machine-readable code and a sentence naming the problem."""

    error: str = Field(examples=["unreadable_image"])
    detail: str = Field(examples=["not a PNG, JPEG or DICOM image (starts with b'hello')"])


class Health(BaseModel):
    status: Literal["ok", "starting"]
    model_loaded: bool


class InputSpec(BaseModel):
    image_size: int = Field(description="side of the square the image is squashed to")
    channels: int
    mean: list[float]
    std: list[float]


class ModelCard(BaseModel):
    name: str = Field(description="backbone name in the medlens model registry")
    data: dict[str, str | None] = Field(description="what the model was trained on")
    created: str | None
    versions: dict[str, str]
    epoch: int | None = None
    metrics: dict[str, float | None] = Field(description="validation metrics of the checkpoint; null: undefined")


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    request_seconds: float = Field(description="longest a request may wait for and use the model before a 503")


Kind = Literal["classifier", "ensemble", "probe"]
Inputs = Literal["chest-xray", "face-photo", "image"]


class ModelInfo(BaseModel):
    kind: Kind = Field(description="the checkpoint's kind: a network, a fold ensemble, or a probe (embedder + head)")
    inputs: Inputs = Field(description="what the model was made for; the X-ray guard applies to chest-xray")
    task: str = Field(description="multilabel: findings with thresholds; multiclass: one class per image")
    labels: list[str]
    thresholds: list[float] = Field(description="operating threshold per label, in label order (multilabel only)")
    input: InputSpec | None = Field(description="the network's input; null for probes (e.g. aligned face chips)")
    card: ModelCard
    cam_methods: list[str]
    ood_guard: bool = Field(description="whether inputs are checked for looking like a chest X-ray")
    limits: Limits
    notice: str = RESEARCH_NOTICE


class Finding(BaseModel):
    label: str
    probability: float
    threshold: float | None = Field(default=None, description="its operating threshold; null for multiclass")
    positive: bool = Field(description="over its threshold (multiclass: the most probable class)")


class Heatmap(BaseModel):
    label: str
    method: str
    width: int
    height: int
    png_base64: str = Field(description="the heatmap over the image, PNG, base64")


class ImageInfo(BaseModel):
    format: Literal["png", "jpeg", "dicom"]
    width: int
    height: int
    dicom: dict[str, DicomValue] | None = Field(
        default=None, description="non-identifying technical DICOM fields only (never patient fields)"
    )


class OodReport(BaseModel):
    flag: bool = Field(description="true: the image does not look like a chest X-ray; do not trust findings")
    score: float = Field(description="largest check score in [0, 1]; flagged from 0.5")
    checks: dict[str, float]
    reasons: list[str]


class Timings(BaseModel):
    """Milliseconds per step. ``forward`` is the model's own time on its thread, after ``queue`` (waiting
    for it behind other requests); ``ood`` runs beside the forward pass, so the steps may sum to more
    than ``total``."""

    read: float
    preprocess: float
    ood: float
    queue: float = 0.0
    forward: float
    cam: float
    total: float


class Prediction(BaseModel):
    kind: Kind
    inputs: Inputs
    task: str
    findings: list[Finding] = Field(description="every label, most probable first")
    positives: list[str] = Field(
        description="labels over their threshold, most probable first (multiclass: the top class)"
    )
    top_k: list[Finding] = Field(description="the most probable labels or classes")
    heatmaps: list[Heatmap]
    image: ImageInfo
    ood: OodReport | None = Field(description="null where the model expects no chest X-ray (e.g. face photos)")
    timings_ms: Timings
    notice: str = RESEARCH_NOTICE
