"""Class activation maps by name, computed by pytorch-grad-cam on the layer every model names.

Each method is the package's own class (a new one overrides one step of its ``BaseCAM``); medlens only
says which layers to hook (``model.cam_layers``: one, or a fold ensemble's one per member, whose maps
grad-cam averages), how to turn ViT tokens into a map (``model.cam_reshape``) and which output to
explain: the logit of a finding (multi-label) or of a class (multi-class).

A :class:`CamExplainer` registers its hooks once and is reused for every image, as the server does. A map
needs d(logit)/d(activation) only, so while it runs the model's weights are not asked for gradients and
the graph is cut at the CAM layer: the backward pass covers only the layers after it, and no weight
gradient is computed or left behind.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from medlens.errors import ConfigError
from medlens.models import Classifier

CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "eigencam": EigenCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
}

SCORECAM_BATCH_SIZE = 32
"""Masked copies of the input ScoreCAM scores per forward pass: one per feature channel in all."""


def cam_method(name: str) -> type[BaseCAM]:
    """The pytorch-grad-cam class registered as ``name``."""
    try:
        return CAM_METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown CAM method {name!r}; choose one of {', '.join(CAM_METHODS)}") from None


class CamExplainer:
    """One model and one CAM method, with hooks registered once and reused by every call.

    Calls are serialised (the hooks hold one image's activations at a time), so one explainer can serve
    concurrent requests. Puts ``model`` in eval mode; :meth:`close` (or leaving a ``with`` block) removes
    the hooks.
    """

    def __init__(self, model: Classifier, method: str = "gradcam"):
        cam_class = cam_method(method)
        self.method = method
        self.model = model.eval()
        self._lock = threading.Lock()
        # A fold ensemble names each member's layer: grad-cam then averages the members' normalised maps.
        layers = model.cam_layers
        # Ahead of grad-cam's own hooks, so they record (and attach their gradient hook to) the cut output.
        self._cuts = [layer.register_forward_hook(self._cut_graph, prepend=True) for layer in layers]
        self._cam = cam_class(model, layers, reshape_transform=model.cam_reshape)
        if isinstance(self._cam, ScoreCAM):
            self._cam.batch_size = SCORECAM_BATCH_SIZE

    def __call__(self, x: torch.Tensor, target: int) -> np.ndarray:
        """The ``(H, W)`` float32 map in [0, 1] of output ``target`` for one input ``x`` of ``(1, C, H, W)``."""
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"explain one image at a time: x must be (1, C, H, W), got {tuple(x.shape)}")
        if not 0 <= target < self.model.num_classes:
            raise ValueError(f"target must be an output index in [0, {self.model.num_classes}), got {target}")
        with self._lock, torch.enable_grad(), _weights_frozen(self.model):
            try:
                maps = self._cam(x, [ClassifierOutputTarget(int(target))])
            finally:
                # grad-cam keeps the last activations, gradients and output (with its graph) on the object.
                self._cam.activations_and_grads.clear()
                self._cam.outputs = None
        return np.clip(maps[0], 0.0, 1.0).astype(np.float32)

    def _cut_graph(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(self._cam.uses_gradients)

    def close(self) -> None:
        """Remove the hooks from the model."""
        for cut in self._cuts:
            cut.remove()
        self._cam.activations_and_grads.release()

    def __enter__(self) -> CamExplainer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def explain(model: Classifier, x: torch.Tensor, target: int, method: str = "gradcam") -> np.ndarray:
    """The ``method`` map of output ``target`` for ``x`` of ``(1, C, H, W)``: ``(H, W)`` float32 in [0, 1].

    Registers and removes its hooks; to explain many images, keep one :class:`CamExplainer` instead.
    """
    with CamExplainer(model, method) as explainer:
        return explainer(x, target)


@contextmanager
def _weights_frozen(model: nn.Module) -> Iterator[None]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)
