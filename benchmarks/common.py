"""What the benchmarks share: the machine line, alternate timing, min/median/max.

Importing this module applies medlens's CPU tuning, as the ``medlens`` command does (``apply_cpu_defaults``:
torch's OpenMP wait policy, the allocator, threads); the wait policy only takes effect before torch loads,
so every script imports ``common`` before torch (``import common`` sorts first).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from medlens.runtime import apply_cpu_defaults, available_cores

apply_cpu_defaults()  # what the medlens command does first; before torch loads, for the OpenMP wait policy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NIH_IMAGES = SHARED / "nih14" / "images"


def foreign_env() -> dict[str, str]:
    """This process's environment without the OpenMP and medlens settings medlens made: for a peer's process
    that must run with its own defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MEDLENS_"))}


def machine() -> str:
    """One line: processor, cores, load, versions (torch and onnxruntime when imported)."""
    import sys

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts = [f"{platform.processor() or platform.machine()}, {available_cores()} cores, load average {load:.1f}"]
    parts.append(f"python {platform.python_version()}")
    for name in ("torch", "onnxruntime", "cv2", "PIL", "torchxrayvision"):
        module = sys.modules.get(name)
        if module is not None:
            parts.append(f"{name} {getattr(module, '__version__', '?')}")
    if "torch" in sys.modules:
        parts.append(f"{sys.modules['torch'].get_num_threads()} torch threads")
    return ", ".join(parts)


def alternate(
    calls: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, taken in turns (the order rotating), so load hits all alike.

    ``clock=time.process_time`` counts this process's CPU seconds instead: for single-threaded work on a
    shared machine, where other jobs' load stretches wall-clock time but not CPU time.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            calls[name]()
            seconds[name].append(clock() - start)
    return seconds


def spread(values: list[float], digits: int = 1) -> str:
    """``min/median/max``."""
    return "/".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def rates(seconds: list[float], items: int) -> list[float]:
    """Items per second of each timing."""
    return [items / s for s in seconds]


NIH_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
]  # fmt: skip


def random_checkpoint(folder: Path, model_name: str, size: int) -> Path:
    """A checkpoint with random weights and the 14 NIH labels: speed does not depend on what weights learned."""
    import torch

    from medlens.models import create_model
    from medlens.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(NIH_LABELS), in_chans=1, pretrained=False)
    manifest = {
        "task": "multilabel",
        "labels": NIH_LABELS,
        "model": {"name": model_name, "num_classes": len(NIH_LABELS), "in_chans": 1, "head": "linear"},
        "preprocessing": {
            "image_size": size, "channels": 1, "mean": list(model.mean), "std": list(model.std), "resize": "squash"
        },
        "data": {"source": "none: random weights for benchmarking", "kind": "none"},
        "thresholds": [0.5] * len(NIH_LABELS),
        "temperature": 1.0,
        "metrics": {},
    }  # fmt: skip
    return save_checkpoint(folder / "best", model, manifest)
