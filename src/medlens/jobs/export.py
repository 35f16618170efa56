"""``medlens export``: a checkpoint's model as an ONNX graph, checked against torch and raced against it.

The graph goes into the checkpoint folder as ``model.onnx`` only after its logits match the torch
model's within :data:`PARITY_TOLERANCE` on the given images (real ones are the stronger check) or on a
generated batch. Both backends are then timed, alternately so a busy machine's load hits both alike, and
the manifest's ``onnx`` record says which was faster, with the hashes that tie the graph to the weights:
:func:`medlens.backends.choose_backend` reads that record.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from medlens.backends import ONNX_FILE, OnnxRunner
from medlens.data.files import image_files
from medlens.errors import CheckpointError, ConfigError
from medlens.extras import MissingExtraError, require
from medlens.inference import NetworkModel, load_model
from medlens.io import file_sha256
from medlens.models.checkpoint import WEIGHTS, update_manifest

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
"""Largest absolute logit difference allowed between the ONNX graph and the torch model."""
OPSET = 18
MIN_OPSET = 17


@dataclass(frozen=True)
class ExportReport:
    """What one export measured; also the manifest's ``onnx`` record (with the hashes)."""

    path: str
    exporter: str
    opset: int
    parity_max_abs_diff: float
    parity_images: int
    parity_source: str
    batch_size: int
    torch_img_s: float
    onnxruntime_img_s: float
    faster: str


def export_onnx(
    checkpoint: str | Path,
    images: Sequence[str | Path] = (),
    batch_size: int = 32,
    repeats: int = 3,
    opset: int = OPSET,
) -> ExportReport:
    """Export, check parity on ``images`` (else a generated batch), time both backends, record the result."""
    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is not supported: choose {MIN_OPSET} or later (default {OPSET})")
    for module in ("onnx", "onnxscript"):  # torch's exporters import them
        require(module, extra="onnx")
    onnxruntime = require("onnxruntime", extra="onnx")
    # ONNX Runtime's CPU provider is what the export is checked and raced against: torch on the CPU too.
    predictor: NetworkModel = load_model(checkpoint, backend="torch", device="cpu")  # type: ignore[assignment]
    if predictor.network is None:
        raise ConfigError(
            f"{checkpoint} is a {predictor.kind} checkpoint ({predictor.description}): only networks export to ONNX"
        )
    folder = Path(predictor.path)  # type: ignore[arg-type]
    tmp = folder / f".{ONNX_FILE}.tmp"
    try:
        exporter = _export(predictor, tmp, opset)
        runner = OnnxRunner(tmp)
        x, source = _parity_batch(predictor, images)
        with torch.no_grad():
            diff = float((runner(x) - predictor.forward(x)).abs().max())
        if not diff <= PARITY_TOLERANCE:
            raise CheckpointError(
                f"the ONNX graph's logits differ from torch's by up to {diff:.2e} on {len(x)} {source} images "
                f"(allowed {PARITY_TOLERANCE:.0e}); nothing was written. Try --opset 17, or report the model name"
            )
        torch_rate, onnx_rate = _race(predictor, runner, batch_size, repeats)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, folder / ONNX_FILE)
    report = ExportReport(
        path=str(folder / ONNX_FILE),
        exporter=exporter,
        opset=opset,
        parity_max_abs_diff=diff,
        parity_images=len(x),
        parity_source=source,
        batch_size=batch_size,
        torch_img_s=round(torch_rate, 2),
        onnxruntime_img_s=round(onnx_rate, 2),
        faster="onnxruntime" if onnx_rate > torch_rate else "torch",
    )
    record = {
        **{k: v for k, v in asdict(report).items() if k != "path"},
        "sha256": file_sha256(folder / ONNX_FILE),
        "weights_sha256": file_sha256(folder / WEIGHTS),
        "onnxruntime": onnxruntime.__version__,
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    update_manifest(folder, onnx=record)
    return report


def export_or_warn(checkpoint: str | Path, images: Sequence[str | Path] = ()) -> ExportReport | None:
    """:func:`export_onnx` at the end of training, so that predict and serve take the faster backend by default.

    The export is an accelerator, not the result: when it fails (a model the exporters cannot trace, a
    parity miss, a full disk) the checkpoint stays a complete torch checkpoint and this warns instead of
    raising; the export itself writes nothing unless it passes.
    """
    try:
        report = export_onnx(checkpoint, images)
    except MissingExtraError as exc:  # an install without the extra: torch is the backend the user chose
        log.info("%s is not exported to ONNX: %s", checkpoint, exc)
        return None
    except Exception as exc:  # any exporter or runtime failure leaves the torch checkpoint as it was
        log.warning("%s was not exported to ONNX (%s: %s); it predicts with torch", checkpoint, type(exc).__name__, exc)
        return None
    log.info(
        "%s exported to ONNX: logits within %.1e of torch on %d %s images; %s is faster here (%.1f vs %.1f img/s)",
        checkpoint,
        report.parity_max_abs_diff,
        report.parity_images,
        report.parity_source,
        report.faster,
        max(report.torch_img_s, report.onnxruntime_img_s),
        min(report.torch_img_s, report.onnxruntime_img_s),
    )
    return report


def _export(predictor: NetworkModel, out: Path, opset: int) -> str:
    """Write the graph with the dynamo exporter, or the TorchScript one where dynamo fails; says which."""
    model = copy.deepcopy(predictor.network).to(memory_format=torch.contiguous_format).eval()
    example = (torch.zeros(2, predictor.channels, predictor.image_size, predictor.image_size),)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the exporters' notes on traced control flow
            torch.onnx.export(
                model,
                example,
                str(out),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                verbose=False,
                **names,
            )
        return "dynamo"
    except Exception as exc:  # torch.export refuses some timm models with a wide range of types
        log.info("the dynamo exporter failed (%s: %s); using the TorchScript exporter", type(exc).__name__, exc)
    torch.onnx.export(
        model,
        example,
        str(out),
        dynamo=False,
        opset_version=opset,
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        **names,
    )
    return "torchscript"


def _parity_batch(predictor: NetworkModel, images: Sequence[str | Path]) -> tuple[torch.Tensor, str]:
    """The model inputs parity is checked on: up to 32 of ``images``, else 8 generated ones."""
    if images:
        paths = image_files(images)[:32]
        return predictor.to_tensor([predictor.read(p) for p in paths]), "real"
    rng = np.random.default_rng(0)
    side, channels = predictor.image_size, predictor.channels
    shape = (8, side, side) if channels == 1 else (8, side, side, 3)
    return predictor.prepared_tensor(list(rng.integers(0, 256, shape, dtype=np.uint8))), "generated"


def _race(predictor: NetworkModel, runner: OnnxRunner, batch_size: int, repeats: int) -> tuple[float, float]:
    """Median images/s of torch and of ONNX Runtime on one batch, timed alternately after a warm-up."""
    side, channels = predictor.image_size, predictor.channels
    x = torch.rand(batch_size, channels, side, side).contiguous(memory_format=torch.channels_last)
    calls: tuple[Callable[[], object], Callable[[], object]] = (lambda: predictor.network(x), lambda: runner(x))
    seconds: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for call, times in zip(calls, seconds, strict=True):
                start = time.perf_counter()
                call()
                if round_:  # the first round warms both up
                    times.append(time.perf_counter() - start)
    torch_s, onnx_s = (statistics.median(times) for times in seconds)
    return batch_size / torch_s, batch_size / onnx_s
