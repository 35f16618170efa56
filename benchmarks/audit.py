"""How long ``medlens audit`` takes next to ``medlens evaluate`` of the same run on the same 200 images.

A tiny run (``tiny`` at 128 px, 1 epoch on 64 phantoms) is scored on 200 fresh multi-class phantoms
(256 px), stamped with their class's site so that every check has something to find: evaluate (scores,
bootstrap, report.html) and audit (one read of every image, six border covers and the text cover as forward
passes, two source probes, 32 heatmaps, audit.html) alternate, the order rotating. The goal: audit at most
2x evaluate on 2 cores. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
from common import alternate, machine, spread

from medlens.config import load_config
from medlens.data.phantoms import generate_phantoms
from medlens.jobs.audit import audit
from medlens.jobs.evaluate import evaluate
from medlens.jobs.train import train

GOAL = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200, help="images scored (default 200)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trained_on = generate_phantoms(root / "train", n=64, task="multiclass", size=256, progress=False, marker=True)
        scored = generate_phantoms(root / "scored", n=args.n, task="multiclass", size=256, seed=1, progress=False,
                                   marker=True)  # fmt: skip
        overrides = [f"model.name={args.model}", f"data.image_size={args.image_size}", "train.epochs=1",
                     "train.batch_size=16", "train.export_onnx=false", f"data.source={trained_on}"]  # fmt: skip
        train(load_config(None, overrides), root / "run", progress=False)
        calls = {
            "evaluate": lambda: evaluate(root / "run", root / "eval", source=scored, progress=False),
            "audit": lambda: audit(root / "run", root / "audit", source=scored, progress=False),
        }
        seconds = alternate(calls, repeats=args.repeats, warmup=1)
    ratio = statistics.median(seconds["audit"]) / statistics.median(seconds["evaluate"])
    for name, values in seconds.items():
        print(f"{name:<9} {spread(values, 2)} s (min/median/max, {args.n} images)")
    print(f"audit / evaluate {ratio:.2f} (goal <= {GOAL:.0f})")
    print(json.dumps({"audit_vs_evaluate": round(ratio, 3), "audit_s": round(statistics.median(seconds["audit"]), 2),
                      "evaluate_s": round(statistics.median(seconds["evaluate"]), 2), "n": args.n,
                      "model": args.model, "image_size": args.image_size}))  # fmt: skip


if __name__ == "__main__":
    main()
