"""The main job on the embedded default: phantoms -> training -> evaluation on the held-out split."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlens.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/demo.yaml")


def run_demo(
    out: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Train the demo config into ``out/run`` (resuming a broken run) and evaluate its test split."""
    from medlens.config import load_config
    from medlens.evaluation.evaluate import evaluate, format_metrics
    from medlens.training.fit import train

    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(
            f"demo config {str(path)!r} not found: run from the repository root or pass --config"
        )
    out = Path(out)
    config = load_config(path, overrides)
    run_dir = out / "run"
    print(f"training {config.model.name} on {config.data.phantoms.n} phantoms into {run_dir}")
    train(config, run_dir, resume=True)
    result = evaluate(run_dir, out / "evaluation", split="test", progress=False)
    print(format_metrics(result.metrics))
    print(f"evaluation written to {out / 'evaluation'}")
    return result.metrics
