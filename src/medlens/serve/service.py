"""The model behind the HTTP app: one upload in, one :class:`~medlens.serve.schemas.Prediction` out.

No HTTP here: the app parses requests and serialises answers; a served model reads the bytes, checks the
image, predicts and explains. :class:`ClassifierModel` serves image checkpoints (chest X-rays, or photos
when the model was trained on faces), :class:`FaceModel` face-embedding checkpoints (top-k classes,
occlusion maps); anything with the same methods (:class:`ServedModel`) can stand behind the app.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from PIL import Image

from medlens.data.png import compile_now
from medlens.data.readers import LoadedImage, load_image
from medlens.explain.cam import CAM_METHODS, CamExplainer
from medlens.explain.overlay import blend
from medlens.explain.study import Study, classifier_study, face_study_of
from medlens.faces.detect import NoFaceError
from medlens.faces.pipeline import FACE_KIND, FacePredictor
from medlens.inference import Predictor
from medlens.ood import assess_upload, expects_chest_xrays
from medlens.runtime import available_cores
from medlens.serve.schemas import (
    Finding,
    Heatmap,
    ImageInfo,
    InputSpec,
    Limits,
    ModelCard,
    ModelInfo,
    OodReport,
    Prediction,
    Timings,
)
from medlens.serve.uploads import RequestError
from medlens.training.checkpoint import read_manifest

log = logging.getLogger(__name__)

TOP_K = 3
SERVED_CAM_METHODS = [name for name in CAM_METHODS if name != "scorecam"]
"""ScoreCAM runs a forward pass per feature channel (2,048 for ResNet-50: a minute on 2 cores), holding the
model thread from every other request meanwhile; the CLI's explain job still offers it."""
REPORT_CAM_METHOD = "gradcam"
HEATMAP_MAX_SIDE = 768
"""Heatmaps of larger images are drawn over a copy shrunk to this longest side: a page shows less, and
the overlay of a 1024 px film costs ~4x the time to colour and compress."""
HEATMAP_PNG_LEVEL = 1
"""zlib level of heatmap PNGs: level 1 encodes ~4x faster than PIL's default 6 for ~15% more bytes."""


@dataclass(frozen=True)
class PredictOptions:
    cam: bool = True
    method: str = "gradcam"
    explain: tuple[str, ...] = ()
    """Labels to draw heatmaps for; empty: the positive ones, else the most probable one."""


class ServedModel(Protocol):
    """What the app needs from a model; calls may come from several threads at once."""

    labels: list[str]

    def info(self) -> ModelInfo: ...

    def predict(self, data: bytes, options: PredictOptions) -> Prediction: ...

    def study(self, data: bytes, view: str | None) -> Study: ...

    def close(self) -> None: ...


def load_served_model(checkpoint: str | Path, limits: Limits) -> ServedModel:
    """The served model for a checkpoint folder (or a run folder), chosen by what its manifest says."""
    if read_manifest(checkpoint).get("kind") == FACE_KIND:
        return FaceModel(FacePredictor.from_checkpoint(checkpoint), limits)
    return ClassifierModel(Predictor.from_checkpoint(checkpoint, spin=False), limits)


class Workers:
    """Where a served model's work runs: model calls on one thread, image work one request per core.

    torch's OpenMP keeps a team of threads per calling thread, so model calls from several request threads at
    once oversubscribe the cores (4 concurrent requests made each forward pass 4.4x slower); one thread also
    serialises CAM hooks and dlib's detector. Decoding and drawing, done on the request's own thread, are
    limited to one request per core, so memory stays bounded however many clients are waiting. A request
    that cannot be served before its deadline (queued behind too many others) gets 503 instead of holding its
    connection open.
    """

    def __init__(self, name: str, request_seconds: float):
        self.request_seconds = request_seconds
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._image_slots = threading.BoundedSemaphore(available_cores())

    def deadline(self) -> float:
        return time.monotonic() + self.request_seconds

    def model(self, deadline: float, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)`` on the model thread; :class:`RequestError` 503 once ``deadline`` passes."""
        return self.result(self.submit(call, *args, **kwargs), deadline)

    def submit(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``call`` on the model thread and go on; :meth:`result` waits for it."""
        return self._model.submit(call, *args, **kwargs)

    def result(self, future: Future, deadline: float) -> Any:
        """What a submitted call returned; :class:`RequestError` 503 once ``deadline`` passes."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            future.cancel()  # not started yet: never runs; running: finishes, and its answer is dropped
            raise self._late() from None

    @contextmanager
    def image_work(self, deadline: float) -> Iterator[None]:
        """A slot for decoding or drawing on the request's own thread, waited for until ``deadline``."""
        if not self._image_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._late()
        try:
            yield
        finally:
            self._image_slots.release()

    def _late(self) -> RequestError:
        return RequestError(
            503, "request_timeout", f"the server could not answer within {self.request_seconds:g} s; retry later"
        )

    def close(self) -> None:
        self._model.shutdown(wait=True, cancel_futures=True)


def _timed(call: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """``call(*args)``, when it started (on the perf counter) and how many seconds it took."""
    start = time.perf_counter()
    result = call(*args)
    return result, start, time.perf_counter() - start


class _Clock:
    """Milliseconds per named step."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def record(self, name: str, ms: float) -> None:
        """A step timed elsewhere (on the model thread)."""
        self.laps[name] = ms

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = (now - self.last) * 1000.0
        self.last = now

    def timings(self) -> Timings:
        return Timings(**self.laps, total=(self.last - self.start) * 1000.0)


class ClassifierModel:
    """A :class:`~medlens.inference.Predictor` served: probabilities, findings, heatmaps, the X-ray guard."""

    def __init__(self, predictor: Predictor, limits: Limits):
        self.predictor = predictor
        self.limits = limits
        self.labels = predictor.labels
        self.guard = expects_chest_xrays(predictor.manifest)
        # CAM hooks fire on every forward of the model they sit on, so they sit on a copy that plain
        # predictions never run through.
        self._cam_predictor = Predictor(copy.deepcopy(predictor.model), predictor.manifest, predictor.path)
        self._explainer: CamExplainer | None = None
        self._workers = Workers("medlens-model", limits.request_seconds)
        compile_now()  # the PNG decoder's loop, so that the first upload does not wait for numba

    def info(self) -> ModelInfo:
        p, manifest = self.predictor, self.predictor.manifest
        return ModelInfo(
            kind="classifier",
            task=p.task,
            labels=p.labels,
            thresholds=p.thresholds,
            input=InputSpec(image_size=p.image_size, channels=p.channels, mean=p.mean, std=p.std),
            card=_card(manifest, manifest["model"]["name"]),
            cam_methods=SERVED_CAM_METHODS,
            ood_guard=self.guard,
            limits=self.limits,
        )

    def predict(self, data: bytes, options: PredictOptions) -> Prediction:
        """Read, check, predict and explain one uploaded image; :class:`ImageReadError` if unreadable."""
        p = self.predictor
        clock = _Clock()
        deadline = self._workers.deadline()
        with self._workers.image_work(deadline):
            # A helper thread inflates a film's PNG while this one undoes its filters: the same work split in
            # two, done 1 ms sooner when a core is free, costing ~0.1 ms of handoffs when none is.
            limit = self.limits.max_pixels
            loaded = load_image(data, channels=p.channels, max_pixels=limit, name="upload", overlap=True)
            clock.lap("read")
            x = p.to_tensor([loaded.pixels])
            clock.lap("preprocess")
        # The forward pass starts now; the X-ray guard, a millisecond on a 128 px copy, runs beside it here.
        submitted = time.perf_counter()
        forward = self._workers.submit(_timed, p.probabilities, x)
        ood = self._check(loaded, data)
        clock.lap("ood")
        (probs,), started, seconds = self._workers.result(forward, deadline)
        clock.lap("forward")
        clock.record("queue", (started - submitted) * 1000.0)
        clock.record("forward", seconds * 1000.0)
        order = np.argsort(-probs, kind="stable")
        ranked = [p.labels[i] for i in order]
        over = set(p.positives(probs))
        positives = [label for label in ranked if label in over]
        shown = list(options.explain)
        if not shown and not (ood and ood.flag):
            shown = positives or ranked[:1]
        heatmaps = self._heatmaps(loaded.pixels, x, shown, options.method, deadline) if options.cam else []
        clock.lap("cam")
        findings = [
            Finding(label=label, probability=float(probs[i]), threshold=float(p.thresholds[i]), positive=label in over)
            for i, label in zip(order, ranked, strict=True)
        ]
        height, width = loaded.pixels.shape[:2]
        dicom = loaded.dicom if loaded.format == "dicom" else None
        return Prediction(
            kind="classifier",
            task=p.task,
            findings=findings,
            positives=positives,
            top_k=findings[:TOP_K],
            heatmaps=heatmaps,
            image=ImageInfo(format=loaded.format, width=width, height=height, dicom=dicom),
            ood=ood,
            timings_ms=clock.timings(),
        )

    def study(self, data: bytes, view: str | None) -> Study:
        """The facts of a study report; reports are rare, so all their work, reading included, runs on the
        model thread, where the raw heatmaps whose peaks name the zones come from the CAM model."""
        return self._workers.model(self._workers.deadline(), self._study, data, view)

    def _study(self, data: bytes, view: str | None) -> Study:
        return classifier_study(
            self._cam_predictor,
            self._explainer_for(REPORT_CAM_METHOD),
            data,
            view=view,
            xray_guard=self.guard,
            name="upload",
            max_pixels=self.limits.max_pixels,
        )

    def _check(self, loaded: LoadedImage, data: bytes) -> OodReport | None:
        if not self.guard:
            return None
        result = assess_upload(loaded, data)
        return OodReport(flag=result.flag, score=result.score, checks=result.checks, reasons=result.reasons)

    def _heatmaps(
        self, pixels: np.ndarray, x: torch.Tensor, shown: list[str], method: str, deadline: float
    ) -> list[Heatmap]:
        if not shown:
            return []
        maps = self._workers.model(deadline, self._maps, x, shown, method)
        with self._workers.image_work(deadline):
            backdrop = _shrunk(pixels, HEATMAP_MAX_SIDE)
            framed = [self.predictor.heatmap_in_image(m, pixels) for m in maps]
            return [_heatmap(label, method, _png(blend(backdrop, m))) for label, m in zip(shown, framed, strict=True)]

    def _maps(self, x: torch.Tensor, shown: list[str], method: str) -> list[np.ndarray]:
        """The ``method`` map of each label in ``shown``; runs on the model thread only."""
        explainer = self._explainer_for(method)
        return [explainer(x, self.labels.index(label)) for label in shown]

    def _explainer_for(self, method: str) -> CamExplainer:
        """The CAM model's explainer for ``method``; model thread only."""
        if self._explainer is None or self._explainer.method != method:
            # One explainer at a time: each one's hooks fire on every forward of the CAM model.
            if self._explainer is not None:
                self._explainer.close()
            self._explainer = CamExplainer(self._cam_predictor.model, method)
        return self._explainer

    def close(self) -> None:
        self._workers.close()
        if self._explainer is not None:
            self._explainer.close()
            self._explainer = None


class FaceModel:
    """A face-embedding checkpoint served: the top-k classes of the largest face and occlusion heatmaps.

    Its inputs are face photos, so the chest-X-ray guard does not apply (``ood`` is null).
    """

    method = "occlusion"

    def __init__(self, predictor: FacePredictor, limits: Limits):
        self.predictor = predictor
        self.limits = limits
        self.labels = predictor.labels
        # dlib's detector and the head serve one image at a time.
        self._workers = Workers("medlens-faces", limits.request_seconds)

    def info(self) -> ModelInfo:
        manifest = self.predictor.manifest
        return ModelInfo(
            kind="face-embedding",
            task="multiclass",
            labels=self.labels,
            thresholds=[],
            input=None,
            card=_card(manifest, f"{manifest['model']['head']} head on {manifest['embedder']['name']} embeddings"),
            cam_methods=[self.method],
            ood_guard=False,
            limits=self.limits,
        )

    def predict(self, data: bytes, options: PredictOptions) -> Prediction:
        """Find the largest face, rank the classes, explain the chosen ones; 422 ``no_face`` without a face."""
        clock = _Clock()
        deadline = self._workers.deadline()
        with self._workers.image_work(deadline):
            loaded = load_image(data, channels=3, max_pixels=self.limits.max_pixels, name="upload")
        clock.lap("read")
        clock.lap("preprocess")  # detection and alignment happen inside the model's own steps
        clock.lap("ood")
        try:
            found = self._workers.model(deadline, self.predictor.predict_image, loaded.pixels, k=TOP_K)
            clock.lap("forward")
            shown = (list(options.explain) or [found.top_k[0][0]]) if options.cam else []
            charts = {
                label: self._workers.model(deadline, self.predictor.explain, loaded.pixels, target=label)
                for label in shown
            }
        except NoFaceError as exc:
            raise RequestError(422, "no_face", str(exc).removeprefix("upload: ")) from None
        clock.lap("cam")
        ranked = sorted(found.probabilities.items(), key=lambda item: -item[1])
        findings = [Finding(label=label, probability=p, positive=rank == 0) for rank, (label, p) in enumerate(ranked)]
        height, width = loaded.pixels.shape[:2]
        return Prediction(
            kind="face-embedding",
            task="multiclass",
            findings=findings,
            positives=[ranked[0][0]],
            top_k=findings[:TOP_K],
            heatmaps=[_heatmap(label, self.method, png) for label, png in charts.items()],
            image=ImageInfo(format=loaded.format, width=width, height=height),
            ood=None,
            timings_ms=clock.timings(),
        )

    def study(self, data: bytes, view: str | None) -> Study:
        """The facts of a study report: the ranking of the largest face and its occlusion map; 422 without a face,
        as for :meth:`predict`."""
        deadline, limit = self._workers.deadline(), self.limits.max_pixels
        study = self._workers.model(deadline, face_study_of, self.predictor, data, name="upload", max_pixels=limit)
        if study.no_face:
            raise RequestError(422, "no_face", study.no_face)
        return study

    def close(self) -> None:
        self._workers.close()


def _card(manifest: dict[str, Any], name: str) -> ModelCard:
    return ModelCard(
        name=name,
        data={k: None if v is None else str(v) for k, v in manifest.get("data", {}).items()},
        created=manifest.get("created"),
        versions=manifest.get("versions", {}),
        epoch=manifest.get("epoch"),
        metrics={k: _finite_or_none(v) for k, v in manifest.get("metrics", {}).items()},
    )


def _heatmap(label: str, method: str, png: bytes) -> Heatmap:
    width, height = Image.open(io.BytesIO(png)).size  # the header only
    return Heatmap(
        label=label, method=method, width=width, height=height, png_base64=base64.b64encode(png).decode("ascii")
    )


def _shrunk(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """``pixels`` with the longest side at most ``max_side``, aspect ratio kept."""
    height, width = pixels.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=HEATMAP_PNG_LEVEL)
    return buffer.getvalue()


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
