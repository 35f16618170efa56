"""One model contract: load any checkpoint, read and prepare images, score them, explain them, describe itself.

``load_model(path)`` reads a checkpoint's kind once, here, and returns an object that answers the same
questions whatever the kind:

- ``classifier`` and ``ensemble`` (:class:`NetworkModel`): a torch network, one or a fold ensemble, on the
  checkpoint's own preprocessing (the cache's: read, crop, squash-resize, quantise to 8 bits, contrast,
  normalise), so a model sees the same pixels in training and in use; its forward pass may run on ONNX
  Runtime (:mod:`medlens.backends`);
- ``probe`` (:class:`ProbeModel`): a frozen embedder (dlib's face descriptor for face photos) under a
  classical head (SVM, logistic regression, MLP).

Every model has ``labels``, ``task``, ``inputs`` (``chest-xray``, ``face-photo`` or ``image``: what it was
made for, and so whether the X-ray guard applies), ``thresholds`` and ``temperature``; it reads images
(:meth:`read`), prepares them (:meth:`prepare`, thread-safe, so decoding can overlap the model),
scores them (:meth:`logits`, :meth:`probabilities`, :meth:`predict_paths`), gives what its head sees
(:meth:`logits_and_features`), names positives, draws heatmaps
by method (:meth:`heatmaps`: CAMs for networks, occlusion for probes) and gives its model card.
evaluate, explain, predict, study reports and serve all go through it and never ask which kind they hold.
An image a model cannot answer for (a photo without a face) gets a NaN row and a named problem.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from medlens.backends import ONNX_FILE, OnnxRunner, choose_backend
from medlens.data.readers import ImageSource, read_image
from medlens.data.transforms import prepare_image, resize_map, view_box
from medlens.errors import CheckpointError, ConfigError
from medlens.explain.cam import CAM_METHODS, CamExplainer
from medlens.explain.occlusion import occlusion_map
from medlens.models.checkpoint import load_weights, read_manifest, resolve_checkpoint
from medlens.models.ensemble import model_from_manifest
from medlens.models.inputs import probabilities, to_channels_last, to_input
from medlens.training.engine import autocast_dtype, fitting_batch_size, out_of_memory, resolve_device

log = logging.getLogger(__name__)

INPUT_KINDS = ("chest-xray", "face-photo", "image")
OCCLUSION = "occlusion"


@dataclass(frozen=True)
class Problem:
    """Why a model gave no answer for an image: a short code (``no_face``) and a sentence."""

    code: str
    detail: str

    @property
    def summary(self) -> str:
        """The problem in a few words (``no face found``), for a CSV cell or an index line."""
        return self.detail.split(" (")[0].split(";")[0]


@dataclass
class Scores:
    """A batch's logits (N x K; NaN rows where the model could not answer) and what it found per image."""

    values: np.ndarray
    problems: list[Problem | None]
    details: list[dict[str, Any]] = field(default_factory=list)
    """Per image, what the model found beside its scores (a face model: ``n_faces``, ``box``, ``landmarks``)."""

    @property
    def answered(self) -> np.ndarray:
        return np.array([p is None for p in self.problems], dtype=bool)


@dataclass
class Heatmap:
    """One heatmap: ``map`` (H x W, in [0, 1] for CAMs) over ``backdrop`` (float [0, 1], the frame it is
    drawn in: the read image, or a face's aligned chip), with landmarks to mark where there are any."""

    label: str
    method: str
    map: np.ndarray
    backdrop: np.ndarray
    marks: np.ndarray | None = None


class Model(Protocol):
    """What every loaded checkpoint answers (see the module docstring)."""

    path: Path | None
    manifest: dict[str, Any]
    kind: str
    task: str
    labels: list[str]
    thresholds: list[float]
    temperature: float
    inputs: str
    channels: int
    cam_methods: tuple[str, ...]
    name: str
    """What the model is, in a word or two (a network's registered name)."""
    description: str
    network: torch.nn.Module | None
    """The torch network behind the scores (exportable to ONNX), or None (a probe's head is not one)."""
    details: tuple[str, ...]
    """The names of what :meth:`logits` reports per image beside the scores (a face model: ``n_faces``)."""

    @property
    def backend(self) -> str: ...

    def read(self, source: ImageSource, name: str | None = None) -> np.ndarray: ...

    def prepare(self, pixels: np.ndarray) -> Any: ...

    def logits(self, prepared: Sequence[Any]) -> Scores: ...

    def logits_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False) -> Scores: ...

    def probabilities(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray: ...

    def logits_and_features(self, prepared: Sequence[Any]) -> tuple[Scores, np.ndarray]: ...

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def predict_paths(
        self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray: ...

    def positives(self, probs: np.ndarray) -> list[str]: ...

    def heatmaps(
        self, pixels: np.ndarray, targets: Sequence[int], method: str, prepared: Any = None
    ) -> list[Heatmap]: ...

    def close(self) -> None: ...


def load_model(path: str | Path, backend: str | None = None, spin: bool = True, device: str = "auto") -> Model:
    """Load any checkpoint folder (or a run folder's best/) without unpickling anything.

    ``device``: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``: where a network
    runs; ``backend`` and ``spin`` concern its forward passes (see :meth:`NetworkModel.from_checkpoint`).
    """
    folder = resolve_checkpoint(path)
    manifest = read_manifest(folder)
    kind = manifest.get("kind", "classifier")
    if kind in NetworkModel.kinds:
        return NetworkModel.from_checkpoint(folder, backend=backend, spin=spin, device=device)
    if kind in ProbeModel.kinds:
        return ProbeModel.from_checkpoint(folder, device=device)
    known = ", ".join((*NetworkModel.kinds, *ProbeModel.kinds))
    raise CheckpointError(f"{folder}: unknown checkpoint kind {kind!r} (known: {known}); is medlens up to date?")


class _Shared:
    """What every kind computes the same way from its manifest and its logits."""

    manifest: dict[str, Any]
    task: str
    labels: list[str]
    thresholds: list[float]
    temperature: float

    def _describe(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.kind: str = manifest.get("kind", "classifier")
        self.task = manifest["task"]
        self.labels = list(manifest["labels"])
        self.temperature = float(manifest.get("temperature", 1.0))
        self.thresholds = list(manifest.get("thresholds") or [0.5] * len(self.labels))

    def probabilities(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Probabilities of logits (N x K) at the checkpoint's temperature, or at ``temperature``."""
        t = self.temperature if temperature is None else temperature
        return probabilities(torch.as_tensor(logits, dtype=torch.float32), self.task, t).numpy()

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N x K, NaN rows unanswered) for already-read images."""
        return self.probabilities(self.logits([self.prepare(p) for p in images]).values)  # type: ignore[attr-defined]

    def predict_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Probabilities (N x K, NaN rows unanswered) for image files."""
        return self.probabilities(self.logits_paths(paths, batch_size, progress).values)  # type: ignore[attr-defined]

    def positives(self, probs: np.ndarray) -> list[str]:
        """Labels named positive by the checkpoint's thresholds (multi-class: the top class); none unanswered."""
        if not np.isfinite(probs).all():
            return []
        if self.task == "multiclass":
            return [self.labels[int(np.argmax(probs))]]
        return [name for name, p, t in zip(self.labels, probs, self.thresholds, strict=True) if p >= t]

    def _inputs_from_manifest(self, default: str) -> str:
        recorded = self.manifest.get("inputs")
        if recorded in INPUT_KINDS:
            return recorded
        augment = self.manifest.get("config", {}).get("train", {}).get("augment")
        return "face-photo" if augment == "face" else default

    def close(self) -> None:
        """Release what the model holds beside its weights (CAM hooks); it can still predict."""


class NetworkModel(_Shared):
    """A torch network checkpoint (one classifier, or a fold ensemble, which is one module too).

    ``network`` is always the torch model (heatmaps need it); with an ``onnx`` runner, plain forward passes
    run on ONNX Runtime instead (see :mod:`medlens.backends`). CAM hooks sit on a copy of the network, made
    when a heatmap is first asked for, so plain predictions never run through them.
    """

    kinds = ("classifier", "ensemble")
    cam_methods = tuple(CAM_METHODS)
    details: tuple[str, ...] = ()

    def __init__(
        self,
        network: torch.nn.Module,
        manifest: dict[str, Any],
        path: Path | None = None,
        onnx: OnnxRunner | None = None,
        device: torch.device | str = "cpu",
        precision: str | None = None,
    ):
        self._describe(manifest)
        self.device = torch.device(device)
        self.network = to_channels_last(network.eval().to(self.device))
        self.onnx = onnx
        # On a GPU, forward passes use the autocast the model trained with; elsewhere fp32 unless asked.
        trained = manifest.get("precision", "32") if self.device.type == "cuda" else "32"
        self.precision = precision or trained
        self.path = path
        prep = manifest["preprocessing"]
        self.image_size: int = int(prep["image_size"])
        self.channels: int = int(prep["channels"])
        self.mean: list[float] = list(prep["mean"])
        self.std: list[float] = list(prep["std"])
        self.contrast: str = prep.get("contrast", "none")
        self.crop_border: float | str = prep.get("crop_border", 0.0)
        self.resize: str = prep.get("resize", "squash")
        self.inputs = self._inputs_from_manifest("chest-xray")
        spec = manifest.get("model", {})
        self.name: str = spec.get("name", "?")
        self.description = f"{self.name} ({spec.get('head', 'linear')} head)"
        self._explainer: CamExplainer | None = None
        self._explain_lock = threading.Lock()

    @property
    def backend(self) -> str:
        """Where plain forward passes run: ``torch`` or ``onnxruntime``."""
        return "torch" if self.onnx is None else "onnxruntime"

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, backend: str | None = None, spin: bool = True, device: str = "auto"
    ) -> NetworkModel:
        """Load a network checkpoint folder (or a run folder's best/) without unpickling anything.

        ``device``: see :func:`load_model`. ``backend``: ``auto`` (default; $MEDLENS_BACKEND overrides),
        ``torch`` or ``onnxruntime``; on a GPU, ONNX Runtime runs only where ``onnxruntime-gpu`` gives it the
        CUDA provider, else torch runs there.
        ``spin=False`` for calls that come one at a time with other work between them (a server): ONNX
        Runtime's idle threads then sleep at once, instead of spinning on the cores that work needs (the next
        upload's decode took 4.1 ms instead of 2.9 beside them). Batch jobs gain from the spin.
        """
        folder = resolve_checkpoint(path)
        manifest = read_manifest(folder)
        network = model_from_manifest(manifest)
        try:
            network.load_state_dict(load_weights(folder))
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: weights do not fit the model its manifest names ({exc})") from None
        where = resolve_device(device)
        use_onnx = choose_backend(folder, manifest, backend, where) == "onnxruntime"
        onnx = OnnxRunner(folder / ONNX_FILE, spin=spin, device=where) if use_onnx else None
        return cls(network, manifest, folder, onnx, where)

    # -------------------------------------------------------------------------------- images in

    def read(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        return read_image(source, channels=self.channels, name=name)  # type: ignore[arg-type]

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """float [0, 1] image -> the uint8 model-size image the cache would hold."""
        return prepare_image(pixels, self.image_size, self.contrast, self.crop_border, self.resize)

    def to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Read images (float [0, 1]) -> the normalised model input batch."""
        return self.prepared_tensor([self.prepare(p) for p in images])

    def prepared_tensor(self, prepared: Sequence[np.ndarray]) -> torch.Tensor:
        """Already prepared uint8 images -> the normalised model input batch on the model's device (the uint8
        batch travels, pinned and without blocking on a GPU; it is normalised there)."""
        batch = torch.from_numpy(np.stack(prepared))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        x = to_input(batch.to(self.device, non_blocking=True), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last)

    # -------------------------------------------------------------------------------- scores out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised input batch, on the model's device (fp32, whatever the autocast)."""
        if self.onnx is not None:
            return self.onnx(x)
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return self.network(x).float()
        with torch.autocast(self.device.type, dtype=dtype):
            return self.network(x).float()

    def logits(self, prepared: Sequence[np.ndarray]) -> Scores:
        try:
            values = self.forward(self.prepared_tensor(prepared)).cpu().numpy()
        except torch.OutOfMemoryError:
            fits = fitting_batch_size(lambda n: self.forward(self.prepared_tensor(prepared[:n])), len(prepared))
            raise out_of_memory(self.device, len(prepared), fits, f"rerun with --batch-size {fits}") from None
        return Scores(values, [None] * len(values), [{} for _ in values])

    @torch.no_grad()
    def logits_and_features(self, prepared: Sequence[np.ndarray]) -> tuple[Scores, np.ndarray]:
        """:meth:`logits` and what the head sees (N x D float32: the pooled penultimate layer), from one forward
        pass; a network without that split (a fold ensemble) gives its logits as its features."""
        network = self.network
        if not (hasattr(network, "forward_features") and hasattr(network, "forward_head")):
            scores = self.logits(prepared)
            return scores, scores.values
        features = network.forward_features(self.prepared_tensor(prepared))
        pooled = network.forward_head(features, pre_logits=True).float().cpu().numpy()
        values = network.forward_head(features).float().cpu().numpy()
        return Scores(values, [None] * len(values), [{} for _ in values]), pooled

    def logits_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False) -> Scores:
        """Raw logits (N x K) for image files, in batches; evaluation keeps them to report calibration at T=1."""
        paths = list(paths)
        out = np.zeros((len(paths), len(self.labels)), dtype=np.float32)
        bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            out[start : start + len(chunk)] = self.logits([self.prepare(self.read(p)) for p in chunk]).values
            bar.update(len(chunk))
        bar.close()
        return Scores(out, [None] * len(paths), [{} for _ in paths])

    # -------------------------------------------------------------------------------- heatmaps

    def heatmaps(
        self, pixels: np.ndarray, targets: Sequence[int], method: str, prepared: Any = None
    ) -> list[Heatmap]:
        """The ``method`` CAM of each output in ``targets`` for one read image, in the image's frame."""
        if method not in self.cam_methods:
            raise ConfigError(f"unknown heatmap method {method!r} for this model; choose one of {self.cam_methods}")
        x = self.prepared_tensor([self.prepare(pixels) if prepared is None else prepared])
        with self._explain_lock:
            explainer = self._explainer_for(method)
            maps = [explainer(x, int(j)) for j in targets]
        framed = [self.in_image(m, pixels) for m in maps]
        return [Heatmap(self.labels[j], method, m, pixels) for j, m in zip(targets, framed, strict=True)]

    def _explainer_for(self, method: str) -> CamExplainer:
        """One explainer at a time, on a copy of the network: its hooks fire on every forward of the model
        they sit on."""
        if self._explainer is None or self._explainer.method != method:
            if self._explainer is not None:
                self._explainer.close()
            self._explainer = CamExplainer(copy.deepcopy(self.network), method)
        return self._explainer

    def in_image(self, heatmap: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """A model-input map (a CAM) in the frame of the read image ``pixels``.

        Without a border crop or a centre crop that is the map itself (overlays stretch it); with one, the map
        covers only the region the model saw, so it is stretched over that region of an image-sized map that is
        0 elsewhere.
        """
        if not self.crop_border and self.resize == "squash":
            return heatmap
        top, bottom, left, right = view_box(pixels, self.crop_border, self.resize)
        framed = np.zeros(pixels.shape[:2], dtype=np.float32)
        framed[top:bottom, left:right] = resize_map(heatmap, (bottom - top, right - left))
        return framed

    def close(self) -> None:
        with self._explain_lock:
            if self._explainer is not None:
                self._explainer.close()
                self._explainer = None


class ProbeModel(_Shared):
    """A frozen embedder under a classical head: images in, the head's calibrated probabilities out.

    Heatmaps are occlusion maps: the embedder's frame (a face's aligned chip) is greyed patch by patch and
    scored again.
    """

    kinds = ("probe",)

    def __init__(
        self, embedder: Any, head: Any, manifest: dict[str, Any], path: Path | None = None, device: str = "cpu"
    ):
        self._describe(manifest)
        self.embedder = embedder.to(torch.device(device)) if hasattr(embedder, "to") else embedder
        self.head = head
        self.path = path
        self.channels = embedder.channels
        self.inputs = self._inputs_from_manifest(embedder.inputs)
        self.network = None
        self._cam: NetworkModel | None = None
        linear = hasattr(head, "coef_") and hasattr(embedder, "network")
        self.cam_methods = (*CAM_METHODS, OCCLUSION) if linear else (OCCLUSION,)
        self.details = tuple(embedder.no_frame_details)
        self.name = f"{manifest['model'].get('head', 'head')} on {embedder.name}"
        self.description = f"{manifest['model'].get('head', 'head')} head on {embedder.name} embeddings"
        head_labels = [str(label) for label in head.classes_]
        if head_labels != self.labels:
            raise CheckpointError(f"{path}: the head's classes {head_labels} differ from the manifest's labels")

    backend = "scikit-learn"

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> ProbeModel:
        """Load a probe checkpoint: its head, and its embedder (a backbone's weights are in the checkpoint)."""
        from medlens.models.embedders import embedder_from_spec
        from medlens.models.heads import EMBEDDER_PREFIX, load_head

        folder = resolve_checkpoint(path)
        manifest = read_manifest(folder)
        kind = manifest.get("kind", "classifier")
        if kind not in cls.kinds:
            raise CheckpointError(f"{folder} is a {kind!r} checkpoint, not a probe: load it with load_model")
        weights = load_weights(folder)
        own = {k.removeprefix(EMBEDDER_PREFIX): v for k, v in weights.items() if k.startswith(EMBEDDER_PREFIX)}
        embedder = embedder_from_spec(manifest["embedder"], own)
        return cls(embedder, load_head(folder, weights), manifest, folder, resolve_device(device))

    def read(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        return read_image(source, channels=self.channels, name=name)  # type: ignore[arg-type]

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """A read image as it is: the embedder finds its frame in it (a face, a backbone's view) when scoring."""
        return pixels

    def logits_and_features(self, prepared: Sequence[np.ndarray]) -> tuple[Scores, np.ndarray]:
        """:meth:`logits` and what the head sees: the embedder's vectors (N x D; NaN rows where no frame)."""
        frames, problems, details = [], [], []
        for image in prepared:
            frame, problem = self._frame(image)
            frames.append(frame)
            problems.append(problem)
            details.append(frame.details if frame is not None else dict(self.embedder.no_frame_details))
        vectors = np.full((len(prepared), self.embedder.size), np.nan, dtype=np.float32)
        found = [i for i, frame in enumerate(frames) if frame is not None]
        if found:
            vectors[found] = self.embedder.embed_frames([frames[i].image for i in found])
        return Scores(self._head_logits(vectors), problems, details), vectors

    def logits(self, prepared: Sequence[np.ndarray]) -> Scores:
        return self.logits_and_features(prepared)[0]

    def logits_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False) -> Scores:
        """Logits of image files, embeddings read from (and added to) the run's embedding cache."""
        vectors, details = self.embedder.embed_paths(list(paths), self._cache_dir(), progress=progress)
        problems = [None if np.isfinite(v).all() else self._problem() for v in vectors]
        return Scores(self._head_logits(vectors), problems, details)

    def _head_logits(self, vectors: np.ndarray) -> np.ndarray:
        out = np.full((len(vectors), len(self.labels)), np.nan, dtype=np.float32)
        found = np.isfinite(vectors).all(axis=1)
        if found.any():
            out[found] = self.head.decision_function(vectors[found])
        return out

    def _frame(self, image: np.ndarray) -> tuple[Any, Problem | None]:
        try:
            return self.embedder.frame(image, name="image"), None
        except self.embedder.no_frame_error as exc:  # nothing to describe in it (a photo without a face)
            return None, self._problem(str(exc).removeprefix("image: "))

    def _problem(self, detail: str | None = None) -> Problem:
        return Problem(self.embedder.no_frame_code, detail or self.embedder.no_frame)

    def _cache_dir(self) -> Path | None:
        configured = (self.manifest.get("config", {}).get("data") or {}).get("cache")
        if configured:
            return Path(configured)
        from medlens.runs import EMBEDDING_CACHE_DIR

        return None if self.path is None else self.path.parent / EMBEDDING_CACHE_DIR

    def heatmaps(
        self, pixels: np.ndarray, targets: Sequence[int], method: str = OCCLUSION, prepared: Any = None,
        patch_size: int = 30, stride: int = 15,
    ) -> list[Heatmap]:  # fmt: skip
        """Occlusion maps over the embedder's frame of the image (a face's chip, marked with its landmarks; a
        backbone's view, in the image's frame); a linear probe on a backbone also has CAMs, through it."""
        if method not in self.cam_methods:
            raise ConfigError(f"unknown heatmap method {method!r} for this model; choose one of {self.cam_methods}")
        if method != OCCLUSION:
            return self._cam_model().heatmaps(pixels, targets, method)
        frame = self.embedder.frame(self.prepare(pixels) if prepared is None else prepared, name="image")

        def score(images: list[np.ndarray]) -> np.ndarray:
            return self.probabilities(self.head.decision_function(self.embedder.embed_frames(images)))

        found = []
        for j in targets:
            heat = occlusion_map(frame.image, score, int(j), patch_size=patch_size, stride=stride).heatmap
            if frame.marks is None:  # the backbone's view of the image: back in the image's frame
                found.append(Heatmap(self.labels[j], method, self.embedder.in_image(heat, pixels), pixels))
            else:  # over the face's chip, with its landmarks
                found.append(Heatmap(self.labels[j], method, heat, frame.image.astype(np.float32) / 255.0, frame.marks))
        return found

    def _cam_model(self) -> NetworkModel:
        """The backbone and the linear probe as one network, for CAMs (made once, when first asked)."""
        if self._cam is None:
            from medlens.models.embedders import LinearProbeNetwork

            network = LinearProbeNetwork(self.embedder.network, self.head.coef_, self.head.intercept_)
            manifest = {**self.manifest, "kind": "classifier", "preprocessing": self.embedder.preprocessing}
            self._cam = NetworkModel(network, manifest, self.path, device=self.embedder.device)
        return self._cam

    def close(self) -> None:
        if self._cam is not None:
            self._cam.close()


def model_card(model: Model) -> list[tuple[str, str]]:
    """The model card in brief: what the model is, what it learned from, how well it did on validation."""
    manifest = model.manifest
    data = manifest.get("data", {})
    metrics = ", ".join(
        f"{key} {value:.3f}"
        for key, value in (manifest.get("metrics") or {}).items()
        if isinstance(value, int | float) and np.isfinite(value)
    )
    labels = model.labels
    return [
        ("model", model.description),
        ("task", f"{model.task}, {len(labels)} labels" if labels else model.task),
        ("trained on", str(data.get("source", NOT_RECORDED))),
        ("validation metrics", metrics or NOT_RECORDED),
        ("checkpoint created", str(manifest.get("created", NOT_RECORDED))),
    ]


NOT_RECORDED = "not recorded"
