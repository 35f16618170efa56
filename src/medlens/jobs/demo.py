"""The main job on the embedded default: phantoms -> training -> evaluation -> heatmaps scored on masks."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medlens.configs import find_config
from medlens.io import write_atomic

log = logging.getLogger(__name__)

POINTING_TOLERANCE = 15.0
"""Pixels of slack for the pointing game, as in Zhang et al.'s excitation backprop benchmark."""


def run_demo(out: str | Path, config: str | Path = "demo", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train the demo config into ``out/run`` (resuming a broken run), evaluate and explain its test split."""
    from medlens.config import PHANTOMS, load_config
    from medlens.data.phantoms import ensure_phantoms
    from medlens.jobs.evaluate import evaluate, format_metrics
    from medlens.jobs.explain import score_demo
    from medlens.jobs.train import train
    from medlens.runs import PHANTOMS_DIR

    out = Path(out)
    settings = load_config(find_config(config), overrides)
    run_dir = out / "run"
    seconds: dict[str, float] = {}
    with _timed(seconds, "phantoms"):
        if settings.data.source == PHANTOMS:
            spec = settings.data.phantoms
            ensure_phantoms(run_dir / PHANTOMS_DIR, n=spec.n, task=spec.task, size=spec.size, seed=spec.seed)  # type: ignore[arg-type]
    print(f"training {settings.model.name} on {settings.data.phantoms.n} phantoms into {run_dir}")
    with _timed(seconds, "training"):
        train(settings, run_dir, resume=True)
    with _timed(seconds, "evaluation"):
        result = evaluate(run_dir, out / "evaluation", split="test", progress=False)
    print(format_metrics(result.metrics))
    with _timed(seconds, "heatmaps"):
        scores = score_demo(run_dir, method="gradcam", tolerance=POINTING_TOLERANCE)
    write_atomic(out / "evaluation" / "localization.json", json.dumps(scores, indent=2))
    print(format_localization(scores))
    print(f"report: {result.report}")
    print(format_seconds(seconds))
    return {"metrics": result.metrics, "localization": scores, "seconds": seconds}


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - start


def format_seconds(seconds: dict[str, float]) -> str:
    """Each phase's wall time; training includes the preprocessing cache and the ONNX export of best/."""
    phases = ", ".join(f"{phase} {s:.0f} s" for phase, s in seconds.items())
    return f"time: {phases}; {sum(seconds.values()):.0f} s in all"


def format_localization(scores: dict[str, dict[str, float]]) -> str:
    """GradCAM against the phantom masks: pointing game and the share of map energy inside the mask."""
    lines = [f"GradCAM on the test split (pointing game within {POINTING_TOLERANCE:.0f} px; energy in mask)"]
    for finding, summary in scores.items():
        lines.append(
            f"  {finding:<14} n {summary['n']:>4}  pointing {summary['pointing']:.2f}  energy {summary['energy']:.2f}"
        )
    return "\n".join(lines)
