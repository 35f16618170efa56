"""Frozen embedders a probe learns on, found by name, and rebuilt from what a checkpoint records.

An embedder turns images into fixed-length vectors and says what it was made for. It has ``name``,
``channels`` (what to read images as), ``inputs`` (``face-photo``, ``chest-xray``), ``size`` (the vector
length), ``spec()`` (what a checkpoint records to rebuild it), ``frame(pixels)`` (the :class:`Frame` it
describes: a face's aligned chip, a backbone's model-size image; ``no_frame_error`` when there is nothing
to describe), ``embed_frames(images)`` and ``embed_paths(paths, cache_dir)`` (vectors of files, NaN rows
where there is no frame, cached by image content, and per-file details).

- ``dlib_face``: dlib's 128-d face descriptor (the ``faces`` extra), aligned as the config's ``faces``
  section says;
- any backbone :func:`medlens.models.create_model` builds (``resnet50``, ``densenet121``, any timm name), with
  the config's pretrained weights: its pooled features, on the preprocessing the weights bring. Its weights
  are stored in the probe's checkpoint, so the checkpoint needs nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medlens.config import Config, FacesConfig
from medlens.data.readers import read_image
from medlens.data.transforms import prepare_image, resize_map, view_box
from medlens.errors import CheckpointError, MedlensError
from medlens.models.embedding import EmbeddingCache, Frame, file_sha256
from medlens.models.inputs import to_channels_last, to_input

FACE_EMBEDDER = "dlib_face"
BACKBONE = "backbone"
"""The ``embedder.name`` a checkpoint records for a network's features (its ``model.name`` says which)."""
BATCH = 32


class NoFrame(MedlensError):
    """Never raised by a backbone (every image has features); there for the embedder contract."""


def is_embedder(name: str) -> bool:
    """Whether ``name`` is an embedder of its own rather than a backbone."""
    return name == FACE_EMBEDDER


def create_embedder(config: Config) -> Any:
    """The embedder a probe config names: the face descriptor, or a backbone with the config's weights."""
    if config.model.name == FACE_EMBEDDER:
        from medlens.faces.embed import FaceEmbedder

        return FaceEmbedder(config.faces)
    from medlens.models import create_model

    m, d = config.model, config.data
    network = create_model(
        m.name, num_classes=1, in_chans=d.channels, pretrained=m.pretrained, mean=m.mean, std=m.std,
        input_size=m.input_size,
    )  # fmt: skip
    preprocessing = {
        "image_size": d.image_size,
        "channels": d.channels,
        "mean": list(network.mean),
        "std": list(network.std),
        "resize": network.preprocessing.resize,
        "contrast": d.contrast,
        "crop_border": d.crop_border,
    }
    inputs = "face-photo" if config.train.augment == "face" else "chest-xray"
    return BackboneEmbedder(network, preprocessing, inputs)


def embedder_from_spec(spec: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> Any:
    """The embedder a checkpoint's ``embedder`` record describes; ``weights``: the checkpoint's ``embedder.*``."""
    name = spec.get("name")
    if name == FACE_EMBEDDER:
        from medlens.faces.embed import FaceEmbedder

        return FaceEmbedder(FacesConfig.from_dict(spec.get("faces", {})))
    if name == BACKBONE:
        from medlens.models import create_model

        model = spec["model"]
        network = create_model(model["name"], num_classes=1, in_chans=int(model["in_chans"]), pretrained=False)
        try:
            network.backbone.load_state_dict(dict(weights))
        except RuntimeError as exc:
            raise CheckpointError(f"the probe's backbone weights do not fit {model['name']} ({exc})") from None
        return BackboneEmbedder(network, dict(spec["preprocessing"]), spec.get("inputs", "chest-xray"), spec)
    raise CheckpointError(f"unknown embedder {name!r} in the checkpoint; known: {FACE_EMBEDDER}, {BACKBONE}")


class BackboneEmbedder:
    """A frozen network's pooled (pre-logit) features, on the preprocessing of its weights."""

    no_frame = "no embedding"
    no_frame_code = "no_embedding"
    no_frame_error = NoFrame
    no_frame_details: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, network: nn.Module, preprocessing: dict[str, Any], inputs: str, spec: Mapping[str, Any] | None = None
    ):
        self.network = to_channels_last(network.eval())
        for param in self.network.parameters():
            param.requires_grad_(False)
        self.preprocessing = preprocessing
        self.inputs = inputs
        self.name = network.name
        self.size = int(network.num_features)
        self.channels = int(preprocessing["channels"])
        self.device = torch.device("cpu")
        self._weights = (spec or {}).get("weights") or _weights_record(network)

    def spec(self) -> dict[str, Any]:
        return {
            "name": BACKBONE,
            "model": {"name": self.name, "in_chans": self.channels},
            "preprocessing": self.preprocessing,
            "inputs": self.inputs,
            "size": self.size,
            "weights": self._weights,
        }

    def state(self) -> nn.Module:
        """The module whose weights the checkpoint keeps (the backbone; the probe's head is its own)."""
        return self.network.backbone

    @property
    def cache_tag(self) -> str:
        p = self.preprocessing
        crop = p["crop_border"]
        return f"{self.name}-{self._weights['sha256'][:12]}-{p['image_size']}-{p['contrast']}-{crop}-{p['resize']}"

    def to(self, device: torch.device) -> BackboneEmbedder:
        self.device = device
        self.network.to(device)
        return self

    def frame(self, pixels: np.ndarray, name: str | None = None) -> Frame:
        """The uint8 model-size image the network sees."""
        p = self.preprocessing
        return Frame(prepare_image(pixels, int(p["image_size"]), p["contrast"], p["crop_border"], p["resize"]))

    def in_image(self, heatmap: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """A map over the frame, in the frame of the read image (0 outside the region the network saw)."""
        p = self.preprocessing
        top, bottom, left, right = view_box(pixels, p["crop_border"], p["resize"])
        if (top, left, bottom, right) == (0, 0, *pixels.shape[:2]):
            return heatmap
        framed = np.zeros(pixels.shape[:2], dtype=np.float32)
        framed[top:bottom, left:right] = resize_map(heatmap, (bottom - top, right - left))
        return framed

    @torch.no_grad()
    def embed_frames(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Pooled features (N x size, float32) of model-size uint8 images."""
        out = np.empty((len(images), self.size), dtype=np.float32)
        for start in range(0, len(images), BATCH):
            batch = torch.from_numpy(np.stack(images[start : start + BATCH])).to(self.device)
            x = to_input(batch, self.preprocessing["mean"], self.preprocessing["std"])
            x = x.contiguous(memory_format=torch.channels_last)
            features = self.network.forward_head(self.network.forward_features(x), pre_logits=True)
            out[start : start + len(batch)] = features.float().cpu().numpy()
        return out

    def embed_paths(
        self, paths: Sequence[str | Path], cache_dir: str | Path | None = None, progress: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Features of image files, cached by file hash (and this backbone's weights and preprocessing)."""
        paths = [Path(p) for p in paths]
        cache = EmbeddingCache(cache_dir, self.cache_tag, self.spec()) if cache_dir is not None else None
        vectors = np.full((len(paths), self.size), np.nan, dtype=np.float32)
        keys = [file_sha256(p) for p in paths] if cache is not None else [""] * len(paths)
        missing = []
        for i, key in enumerate(keys):
            hit = cache.get(key) if cache is not None else None
            if hit is None:
                missing.append(i)
            else:
                vectors[i] = hit[0]
        try:
            bar = tqdm(total=len(missing), desc=f"embedding ({self.name})", unit="img", disable=not progress)
            for start in range(0, len(missing), BATCH):
                rows = missing[start : start + BATCH]
                frames = [self.frame(read_image(paths[i], channels=self.channels)).image for i in rows]  # type: ignore[arg-type]
                vectors[rows] = self.embed_frames(frames)
                if cache is not None:
                    for i in rows:
                        cache.put(keys[i], vectors[i], 1)
                bar.update(len(rows))
            bar.close()
        finally:
            if cache is not None:
                cache.save()
        return vectors, [{} for _ in paths]


def _weights_record(network: nn.Module) -> dict[str, Any]:
    """Where the backbone's weights came from and their hash (of the file, or of the tensors themselves)."""
    info = dict(getattr(network, "weights_info", None) or {})
    if not info.get("sha256"):
        digest = hashlib.sha256()
        for name, tensor in sorted(network.backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        info["sha256"] = digest.hexdigest()
        info.setdefault("source", "random initialisation")
    return info


class LinearProbeNetwork(nn.Module):
    """A frozen backbone and a linear probe as one torch module: features, unit length, the probe's logits.

    What a CAM of a linear probe hooks: the backbone's own CAM layer, gradients flowing through the probe.
    """

    def __init__(self, network: nn.Module, coef: np.ndarray, intercept: np.ndarray):
        super().__init__()
        self.network = network
        self.register_buffer("coef", torch.as_tensor(coef, dtype=torch.float32))
        self.register_buffer("intercept", torch.as_tensor(intercept, dtype=torch.float32))
        self.num_classes = int(coef.shape[0])
        self.mean, self.std = network.mean, network.std

    @property
    def cam_layers(self) -> list[nn.Module]:
        return self.network.cam_layers

    @property
    def cam_reshape(self) -> Any:
        return self.network.cam_reshape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.network.forward_head(self.network.forward_features(x), pre_logits=True)
        unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return unit @ self.coef.T + self.intercept
