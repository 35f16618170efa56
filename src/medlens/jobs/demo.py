"""The main job on the embedded default: phantoms -> training -> evaluation -> heatmaps scored on masks."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlens.errors import ConfigError
from medlens.io import write_atomic

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/demo.yaml")
POINTING_TOLERANCE = 15.0
"""Pixels of slack for the pointing game, as in Zhang et al.'s excitation backprop benchmark."""


def run_demo(out: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train the demo config into ``out/run`` (resuming a broken run), evaluate and explain its test split."""
    from medlens.config import load_config
    from medlens.jobs.evaluate import evaluate, format_metrics
    from medlens.jobs.explain import score_demo
    from medlens.jobs.train import train

    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"demo config {str(path)!r} not found: run from the repository root or pass --config")
    out = Path(out)
    config = load_config(path, overrides)
    run_dir = out / "run"
    print(f"training {config.model.name} on {config.data.phantoms.n} phantoms into {run_dir}")
    train(config, run_dir, resume=True)
    result = evaluate(run_dir, out / "evaluation", split="test", progress=False)
    print(format_metrics(result.metrics))
    scores = score_demo(run_dir, method="gradcam", tolerance=POINTING_TOLERANCE)
    write_atomic(out / "evaluation" / "localization.json", json.dumps(scores, indent=2))
    print(format_localization(scores))
    print(f"report: {result.report}")
    return {"metrics": result.metrics, "localization": scores}


def format_localization(scores: dict[str, dict[str, float]]) -> str:
    """GradCAM against the phantom masks: pointing game and the share of map energy inside the mask."""
    lines = [f"GradCAM on the test split (pointing game within {POINTING_TOLERANCE:.0f} px; energy in mask)"]
    for finding, summary in scores.items():
        lines.append(
            f"  {finding:<14} n {summary['n']:>4}  pointing {summary['pointing']:.2f}  energy {summary['energy']:.2f}"
        )
    return "\n".join(lines)
