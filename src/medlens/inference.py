"""One Predictor: load a checkpoint, read and preprocess images, predict.

evaluate, explain, predict and serve all go through it, so preprocessing can never drift between them.
Its preprocessing is the cache's (read, crop, squash-resize, quantise to 8 bits, contrast, normalise), so a model sees
the same pixels in training and in use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medlens.backends import ONNX_FILE, OnnxRunner, choose_backend
from medlens.data.readers import ImageSource, read_image
from medlens.data.transforms import crop_box, prepare_image, resize_map
from medlens.errors import CheckpointError
from medlens.runtime import apply_cpu_defaults, to_channels_last
from medlens.training.batches import to_input
from medlens.training.checkpoint import load_weights, read_manifest, resolve_checkpoint
from medlens.training.ensemble import model_from_manifest
from medlens.training.losses import probabilities


class Predictor:
    """A loaded checkpoint that turns images into probabilities.

    ``model`` is always the torch model (heatmaps need it); with an ``onnx`` runner, plain forward passes
    run on ONNX Runtime instead (see :mod:`medlens.backends`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        manifest: dict[str, Any],
        path: Path | None = None,
        onnx: OnnxRunner | None = None,
    ):
        self.model = to_channels_last(model.eval())
        self.onnx = onnx
        self.manifest = manifest
        self.path = path
        prep = manifest["preprocessing"]
        self.task: str = manifest["task"]
        self.labels: list[str] = list(manifest["labels"])
        self.image_size: int = int(prep["image_size"])
        self.channels: int = int(prep["channels"])
        self.mean: list[float] = list(prep["mean"])
        self.std: list[float] = list(prep["std"])
        self.contrast: str = prep.get("contrast", "none")
        self.crop_border: float | str = prep.get("crop_border", 0.0)
        self.temperature: float = float(manifest.get("temperature", 1.0))
        self.thresholds: list[float] = list(manifest.get("thresholds") or [0.5] * len(self.labels))

    @property
    def backend(self) -> str:
        """Where plain forward passes run: ``torch`` or ``onnxruntime``."""
        return "torch" if self.onnx is None else "onnxruntime"

    @classmethod
    def from_checkpoint(cls, path: str | Path, backend: str | None = None, spin: bool = True) -> Predictor:
        """Load a checkpoint folder (or a run folder's best/) without unpickling anything.

        ``backend``: ``auto`` (default; $MEDLENS_BACKEND overrides), ``torch`` or ``onnxruntime``.
        ``spin=False`` for calls that come one at a time with other work between them (a server): ONNX
        Runtime's idle threads then sleep at once, instead of spinning on the cores that work needs (the next
        upload's decode took 4.1 ms instead of 2.9 beside them). Batch jobs gain from the spin.
        """
        apply_cpu_defaults()
        folder = resolve_checkpoint(path)
        manifest = read_manifest(folder)
        model = model_from_manifest(manifest)  # a fold ensemble is one module too
        try:
            model.load_state_dict(load_weights(folder))
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: weights do not fit the model its manifest names ({exc})") from None
        use_onnx = choose_backend(folder, manifest, backend) == "onnxruntime"
        onnx = OnnxRunner(folder / ONNX_FILE, spin=spin) if use_onnx else None
        return cls(model, manifest, folder, onnx)

    def read(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        return read_image(source, channels=self.channels, name=name)  # type: ignore[arg-type]

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """float [0, 1] image -> the uint8 model-size image the cache would hold."""
        return prepare_image(pixels, self.image_size, self.contrast, self.crop_border)

    def heatmap_in_image(self, heatmap: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """A model-input map (a CAM) in the frame of the read image ``pixels``.

        Without a border crop that is the map itself (overlays stretch it); with one, the map covers only
        the kept region, so it is stretched over that region of an image-sized map that is 0 elsewhere.
        """
        if not self.crop_border:
            return heatmap
        top, bottom, left, right = crop_box(pixels, self.crop_border)
        framed = np.zeros(pixels.shape[:2], dtype=np.float32)
        framed[top:bottom, left:right] = resize_map(heatmap, (bottom - top, right - left))
        return framed

    def to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Read images (float [0, 1]) -> the normalised model input batch."""
        return self.prepared_tensor([self.preprocess(p) for p in images])

    def prepared_tensor(self, prepared: Sequence[np.ndarray]) -> torch.Tensor:
        """Already preprocessed uint8 images -> the normalised model input batch."""
        x = to_input(np.stack(prepared), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx is not None:
            return self.onnx(x)
        return self.model(x).float()

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        return probabilities(self.logits(x), self.task, self.temperature).numpy()

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N x K) for already-read images."""
        return self.probabilities(self.to_tensor(images))

    def predict_prepared(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N x K) for images already through :meth:`preprocess`."""
        return self.probabilities(self.prepared_tensor(prepared))

    def logits_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Raw logits (N x K) for image files, in batches; evaluation keeps them to report calibration at T=1."""
        paths = list(paths)
        out = torch.zeros((len(paths), len(self.labels)))
        bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            out[start : start + len(chunk)] = self.logits(self.to_tensor([self.read(p) for p in chunk]))
            bar.update(len(chunk))
        bar.close()
        return out

    def predict_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Probabilities (N x K) for image files, in batches."""
        logits = self.logits_paths(paths, batch_size, progress)
        return probabilities(logits, self.task, self.temperature).numpy()

    def positives(self, probs: np.ndarray) -> list[str]:
        """Labels named positive by the checkpoint's thresholds (multi-class: the top class)."""
        if self.task == "multiclass":
            return [self.labels[int(np.argmax(probs))]]
        return [name for name, p, t in zip(self.labels, probs, self.thresholds, strict=True) if p >= t]
