"""How long a probe's head takes to fit on cached embeddings: the regularisation chosen by patient-grouped
cross-validation, the fit on the whole training split, and the temperature on validation.

1,000 embeddings of a ResNet-50's width (2,048), 4 classes, 1.3 images per patient, as a probe on cxr4-sized
data caches them; each probe head in turn (``logreg``, ``svm``, ``knn``; ``--heads mlp`` adds the MLP, whose
search over ``alpha`` takes minutes at this width). The goal: at most 10 s per head on 2 cores. The last line
is one JSON object with the seconds per head.
"""

from __future__ import annotations

import argparse
import json
import time

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import numpy as np
from common import machine

from medlens.evaluation.calibration import calibrate
from medlens.models.heads import create_head
from medlens.training.probe import choose_regularisation

GOAL_SECONDS = 10.0


def embeddings(n: int, width: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered non-negative features (pooled ReLU outputs are), labels, and patient ids."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.gamma(1.0, 1.0, (classes, width))
    x = np.maximum(centres[y] + rng.normal(0, 1.5, (n, width)), 0).astype(np.float32)
    patients = np.repeat(np.arange(n), rng.choice([1, 2], n, p=[0.7, 0.3]))[:n]
    return x, np.array([f"class{c}" for c in y]), patients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--heads", nargs="+", default=["logreg", "svm", "knn"])
    args = parser.parse_args()
    print(machine())
    x, y, patients = embeddings(args.n, args.width, 4)
    train, val = slice(0, int(0.85 * args.n)), slice(int(0.85 * args.n), args.n)
    seconds = {}
    for name in args.heads:
        started = time.perf_counter()
        params = {"seed": 0, "calibration_folds": 0, **({"max_iter": 200} if name == "mlp" else {})}
        chosen = choose_regularisation(name, params, x[train], y[train], patients[train])
        head = create_head(name, **{**params, **chosen.get("params", {})}).fit(x[train], y[train])
        labels = [str(c) for c in head.classes_]
        truth = np.eye(len(labels))[[labels.index(v) for v in y[val]]]
        calibrate(head.decision_function(x[val]), truth, "multiclass", labels, "youden")
        seconds[name] = round(time.perf_counter() - started, 2)
        print(f"{name:<7} {seconds[name]:6.2f} s  (chose {chosen.get('params')})")
    worst = max(seconds.values())
    print(f"slowest {worst:.2f} s for {args.n} embeddings of {args.width} (goal {GOAL_SECONDS:.0f} s)")
    print(json.dumps({"seconds": seconds, "max_s": worst, "n": args.n, "width": args.width}))


if __name__ == "__main__":
    main()
