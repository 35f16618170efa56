"""Where a network model's forward pass runs: the checkpoint's torch model, or its ONNX export under ONNX Runtime.

``medlens export`` writes ``model.onnx`` into a checkpoint and records in its manifest (``onnx``) the
sha256 of the graph and of the weights it was exported from, the parity it measured, and which backend
ran faster there. The default backend, ``auto``, takes ONNX Runtime only when that record says it was
faster and both hashes still match; a retrained, edited or damaged checkpoint runs torch, with a warning
naming the problem, so a stale graph is never used. ``MEDLENS_BACKEND=torch|onnxruntime`` (or the
``backend`` argument) forces one; forcing ``onnxruntime`` without a matching export is an error.
The torch model is always loaded: heatmaps need its gradients.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from medlens.errors import CheckpointError, ConfigError
from medlens.extras import install_hint, installed, require
from medlens.io import file_sha256
from medlens.models.checkpoint import WEIGHTS

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
BACKEND_ENV = "MEDLENS_BACKEND"
ONNX_FILE = "model.onnx"


def export_problem(folder: Path, manifest: dict[str, Any]) -> str | None:
    """Why the checkpoint's ONNX export cannot stand in for its weights, or None if it can."""
    advice = f"re-export with: medlens export {folder} --format onnx"
    record = manifest.get("onnx")
    if not record:
        return f"{folder} has no ONNX export; create one with: medlens export {folder} --format onnx"
    if not installed("onnxruntime"):
        return f"ONNX Runtime is not installed here: {install_hint('onnx')}"
    path = folder / ONNX_FILE
    if not path.is_file():
        return f"{path} is missing although the manifest records an export; {advice}"
    if file_sha256(folder / WEIGHTS) != record.get("weights_sha256"):
        return f"{path} was exported from other weights than {folder / WEIGHTS} (the checkpoint changed); {advice}"
    if file_sha256(path) != record.get("sha256"):
        return f"{path} differs from the file exported (sha256 mismatch: damaged or replaced); {advice}"
    return None


def choose_backend(
    folder: Path, manifest: dict[str, Any], backend: str | None = None, device: torch.device | None = None
) -> str:
    """``torch`` or ``onnxruntime`` for this checkpoint: ``backend``, else $MEDLENS_BACKEND, else ``auto``.

    On a GPU, ``auto`` takes ONNX Runtime only where its CUDA provider is installed (``onnxruntime-gpu``),
    and torch otherwise; on the CPU, only where the export measured faster.
    """
    wanted = backend or os.environ.get(BACKEND_ENV) or "auto"
    if wanted not in BACKENDS:
        raise ConfigError(f"unknown backend {wanted!r} (from {BACKEND_ENV} or --backend); choose one of {BACKENDS}")
    if wanted == "torch":
        return "torch"
    on_gpu = device is not None and device.type == "cuda"
    if on_gpu and not cuda_provider():
        if wanted == "onnxruntime":
            raise ConfigError("ONNX Runtime on a GPU needs onnxruntime-gpu (the CUDA provider); or use --backend torch")
        return "torch"
    if wanted == "auto" and not on_gpu and (manifest.get("onnx") or {}).get("faster") != "onnxruntime":
        return "torch"
    problem = export_problem(folder, manifest)
    if problem is None:
        return "onnxruntime"
    if wanted == "onnxruntime":
        raise CheckpointError(problem)
    log.warning("not using the ONNX export: %s. Predicting with torch.", problem)
    return "torch"


def cuda_provider() -> bool:
    """Whether ONNX Runtime can run on CUDA GPUs here (``onnxruntime-gpu``)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


ORT_SPINNING = "session.intra_op.allow_spinning"


class OnnxRunner:
    """An ONNX Runtime session over an exported graph: a float32 (B, C, H, W) batch in, logits out.

    ``spin=False``: idle threads sleep at once instead of spinning a while after each call (see
    :meth:`~medlens.inference.NetworkModel.from_checkpoint`).
    """

    def __init__(self, path: Path, threads: int | None = None, spin: bool = True, device: torch.device | None = None):
        ort = require("onnxruntime", extra="onnx")

        self.device = device or torch.device("cpu")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), *providers]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        if not spin:
            options.add_session_config_entry(ORT_SPINNING, "0")
        options.log_severity_level = 3  # errors only: its graph-optimiser notes are not the user's concern
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own pybind types for unreadable graphs
            raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: batch})[0]).float().to(self.device)
