"""The model behind the HTTP app: one upload in, one :class:`~medlens.serve.schemas.Prediction` out.

No HTTP here: the app parses requests and serialises answers; a :class:`ServedModel` reads the bytes, checks
the image (the X-ray guard, for models of chest X-rays), predicts and explains through the one model contract
of :mod:`medlens.inference`, whatever the checkpoint's kind.
"""

from __future__ import annotations

import base64
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
from typing import Any

import cv2
import numpy as np
from PIL import Image

from medlens.data.png import compile_now
from medlens.data.readers import LoadedImage, load_image
from medlens.explain.cam import CAM_METHODS
from medlens.inference import OCCLUSION, Model, load_model
from medlens.ood import assess_upload
from medlens.reports.study import Study, heatmap_picture, study_of
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

log = logging.getLogger(__name__)

TOP_K = 3
SERVED_METHODS = [*(name for name in CAM_METHODS if name != "scorecam"), OCCLUSION]
"""Heatmap methods the server offers (each model offers its own among them). ScoreCAM runs a forward pass per
feature channel (2,048 for ResNet-50: a minute on 2 cores), holding the model thread from every other request
meanwhile; the CLI's explain job still offers it."""
HEATMAP_MAX_SIDE = 768
"""Heatmaps of larger images are drawn over a copy shrunk to this longest side: a page shows less, and
the overlay of a 1024 px film costs ~4x the time to colour and compress."""


@dataclass(frozen=True)
class PredictOptions:
    cam: bool = True
    method: str | None = None
    """The heatmap method; None: the model's first (Grad-CAM for networks, occlusion for probes)."""
    explain: tuple[str, ...] = ()
    """Labels to draw heatmaps for; empty: the positive ones, else the most probable one."""


def load_served_model(checkpoint: str | Path, limits: Limits, device: str = "auto") -> ServedModel:
    """The served model of a checkpoint folder (or a run folder), whatever its kind, held on ``device``."""
    return ServedModel(load_model(checkpoint, spin=False, device=device), limits)


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


class ServedModel:
    """A loaded model (:mod:`medlens.inference`) behind the app: probabilities, findings, heatmaps, the X-ray
    guard (for models of chest X-rays), study reports. Calls may come from several threads at once."""

    def __init__(self, model: Model, limits: Limits):
        self.model = model
        self.limits = limits
        self.labels = model.labels
        self.guard = model.inputs == "chest-xray"
        self.methods = [name for name in model.cam_methods if name in SERVED_METHODS]
        self._workers = Workers("medlens-model", limits.request_seconds)
        compile_now()  # the PNG decoder's loop, so that the first upload does not wait for numba

    def info(self) -> ModelInfo:
        m = self.model
        spec = None
        if m.network is not None:
            spec = InputSpec(image_size=m.image_size, channels=m.channels, mean=m.mean, std=m.std)  # type: ignore[attr-defined]
        return ModelInfo(
            kind=m.kind,
            inputs=m.inputs,
            task=m.task,
            labels=m.labels,
            thresholds=m.thresholds if m.task == "multilabel" else [],
            input=spec,
            card=_card(m.manifest, m.name),
            cam_methods=self.methods,
            ood_guard=self.guard,
            limits=self.limits,
        )

    def predict(self, data: bytes, options: PredictOptions) -> Prediction:
        """Read, check, predict and explain one uploaded image; :class:`ImageReadError` if unreadable, 422
        when the model cannot answer for it (a face model: no face)."""
        m = self.model
        clock = _Clock()
        deadline = self._workers.deadline()
        with self._workers.image_work(deadline):
            # A helper thread inflates a film's PNG while this one undoes its filters: the same work split in
            # two, done 1 ms sooner when a core is free, costing ~0.1 ms of handoffs when none is.
            limit = self.limits.max_pixels
            loaded = load_image(data, channels=m.channels, max_pixels=limit, name="upload", overlap=True)
            clock.lap("read")
            prepared = m.prepare(loaded.pixels)
            clock.lap("preprocess")
        # The forward pass starts now; the X-ray guard, a millisecond on a 128 px copy, runs beside it here.
        submitted = time.perf_counter()
        forward = self._workers.submit(_timed, m.logits, [prepared])
        ood = self._check(loaded)
        clock.lap("ood")
        scores, started, seconds = self._workers.result(forward, deadline)
        clock.lap("forward")
        clock.record("queue", (started - submitted) * 1000.0)
        clock.record("forward", seconds * 1000.0)
        problem = scores.problems[0]
        if problem is not None:
            raise RequestError(422, problem.code, problem.detail.removeprefix("image: "))
        probs = m.probabilities(scores.values)[0]
        order = np.argsort(-probs, kind="stable")
        ranked = [m.labels[i] for i in order]
        over = set(m.positives(probs))
        positives = [label for label in ranked if label in over]
        shown = list(options.explain)
        if not shown and not (ood and ood.flag):
            shown = positives or ranked[:1]
        method = options.method or self.methods[0]
        if method not in self.methods:
            valid = ", ".join(self.methods)
            raise RequestError(422, "invalid_query", f"method {method!r} does not apply to this model; use {valid}")
        heatmaps = self._heatmaps(loaded.pixels, prepared, shown, method, deadline) if options.cam else []
        clock.lap("cam")
        multilabel = m.task == "multilabel"
        findings = [
            Finding(
                label=label,
                probability=float(probs[i]),
                threshold=float(m.thresholds[i]) if multilabel else None,
                positive=label in over,
            )
            for i, label in zip(order, ranked, strict=True)
        ]
        height, width = loaded.pixels.shape[:2]
        dicom = loaded.dicom if loaded.format == "dicom" else None
        return Prediction(
            kind=m.kind,
            inputs=m.inputs,
            task=m.task,
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
        model thread. 422 when the model cannot answer for the image, as for :meth:`predict`."""
        deadline, limit = self._workers.deadline(), self.limits.max_pixels
        study = self._workers.model(
            deadline, study_of, self.model, data, view=view, name="upload", max_pixels=limit, method=self.methods[0]
        )
        if study.no_answer is not None:
            raise RequestError(422, study.no_answer.code, study.no_answer.detail.removeprefix("upload: "))
        return study

    def _check(self, loaded: LoadedImage) -> OodReport | None:
        if not self.guard:
            return None
        result = assess_upload(loaded)
        return OodReport(flag=result.flag, score=result.score, checks=result.checks, reasons=result.reasons)

    def _heatmaps(
        self, pixels: np.ndarray, prepared: Any, shown: list[str], method: str, deadline: float
    ) -> list[Heatmap]:
        if not shown:
            return []
        targets = [self.labels.index(label) for label in shown]
        maps = self._workers.model(deadline, self.model.heatmaps, pixels, targets, method, prepared)
        with self._workers.image_work(deadline):
            backdrop = _shrunk(pixels, HEATMAP_MAX_SIDE)
            return [_heatmap(h.label, method, heatmap_picture(h, backdrop)) for h in maps]

    def close(self) -> None:
        self._workers.close()
        self.model.close()


def _card(manifest: dict[str, Any], name: str) -> ModelCard:
    """The served model card: what the model is, what it learned from, its validation metrics."""
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


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
