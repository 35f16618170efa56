"""From scratch vs the pixel baseline on real X-rays, and the dlib face probe, measured in one run.

For ``cxr4`` (125 films) and ``nih14`` (219 films) in ../shared/data: patient-grouped 3-fold cross-validation
of the ``cxr4-scratch`` and ``nih14-scratch`` configs (the tiny CNN at 128 px, histogram equalisation, Adam
2e-3, cosine; ``--epochs`` each), pooled out of fold, beside the pixel baseline of ``medlens evaluate``
(logistic regression on 32 x 32 standardised pixels) fitted on the same folds' training images and pooled
the same way. Each fold's network picks its best epoch on its own held-out fold, so its figure carries that
small selection optimism; the baseline has none to carry. Then the ``syndromes12-dlib`` probe on
``faces-lfw15`` (15 people standing in for the syndromes): trained and scored on its held-out test split by
``medlens evaluate``, pixel baseline included. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import numpy as np
import pandas as pd
from common import SHARED, machine

from medlens.config import load_config
from medlens.configs import find_config
from medlens.data.records import load_source
from medlens.evaluation.baseline import PixelBaseline, compare_with_model
from medlens.evaluation.metrics import auc_per_label
from medlens.jobs.baseline import BaselinePixels
from medlens.jobs.cv import FOLDS_FILE, cross_validate
from medlens.models.checkpoint import read_manifest

FOLDS = 3


def scratch_vs_baseline(name: str, source: Path, epochs: int, out: Path) -> dict[str, Any]:
    """Pooled out-of-fold AUCs of the ``NAME-scratch`` config and of the pixel baseline on the same folds."""
    sets = [f"data.source={source}", "data.test_fraction=0", f"train.epochs={epochs}", "train.export_onnx=false"]
    config = load_config(find_config(f"{name}-scratch"), sets)
    started = time.perf_counter()
    metrics = cross_validate(config, out, FOLDS, progress=False, n_resamples=200)
    seconds = time.perf_counter() - started
    pooled = metrics["pooled"]
    table = load_source(source).relabel(pooled["labels"])
    folds = pd.read_csv(out / FOLDS_FILE, dtype=str)
    fold_of = dict(zip(folds["path"], folds["split"], strict=True))
    which = np.array([fold_of[p] for p in table.frame["path"].astype(str)])
    pixels = BaselinePixels(read_manifest(out / "fold0" / "best"), out)
    images, readable = pixels.of(table.paths)
    assert len(readable) == len(table), "every film was cached for training, so every one reads again"
    probs = np.full(table.labels.shape, np.nan)
    for fold in sorted(set(which)):
        held = which == fold
        baseline = PixelBaseline(pooled["task"]).fit(images[~held], table.labels[~held])
        probs[held] = baseline.predict_proba(images[held])
    # Every film is in one held-out fold (no test split), so both pooled AUCs are over the same films.
    fitted = np.isfinite(probs).all(axis=0)
    aucs = auc_per_label(table.labels, np.nan_to_num(probs), pooled["task"])
    n_train = round(len(table) * (FOLDS - 1) / FOLDS)
    baseline = compare_with_model(pooled, [a if fitted[j] else None for j, a in enumerate(aucs)], n_train)
    summary = pooled["auc_summary"]
    return {
        "images": len(table),
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "scratch_macro_auc": pooled["macro_auc"],
        "scratch_mean_auc_summary": summary["mean"],
        "summary_labels": pooled["auc_summary_over"],
        "accuracy": pooled.get("accuracy"),
        "scratch_auc": pooled["auc"],
        "baseline_auc": baseline["auc"],
        "baseline_mean_auc": baseline["mean_auc"],
        "scratch_mean_auc_compared": baseline["model_mean_auc"],
        "labels_compared": baseline["labels_compared"],
        "scratch_beats_baseline": baseline["model_better_overall"],
    }


def face_probe(out: Path) -> dict[str, Any]:
    """The syndromes12-dlib probe on faces-lfw15: validation while training, then its held-out test split."""
    from medlens.jobs.evaluate import evaluate
    from medlens.jobs.train import train

    config = load_config(find_config("syndromes12-dlib"), [f"data.source={SHARED / 'faces-lfw15'}"])
    started = time.perf_counter()
    train(config, out / "run", progress=False)
    trained = time.perf_counter() - started
    metrics = evaluate(out / "run", out / "evaluation", n_resamples=200, progress=False).metrics
    return {
        "photos": len(load_source(SHARED / "faces-lfw15")),
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "test_images": metrics["n_images"],
        "left_out": metrics["n_left_out"],
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_auc": metrics["macro_auc"],
        "baseline_mean_auc": metrics["baseline"].get("mean_auc"),
        "probe_beats_baseline": metrics["baseline"].get("model_better_overall"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15, help="epochs per fold of the scratch configs")
    parser.add_argument("--only", nargs="+", default=["cxr4", "nih14", "faces"], choices=["cxr4", "nih14", "faces"])
    args = parser.parse_args()
    print(machine())
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medlens-transfer-") as tmp:
        for name in ("cxr4", "nih14"):
            if name in args.only:
                found[name] = scratch_vs_baseline(name, SHARED / name, args.epochs, Path(tmp) / name)
                shown = found[name]
                print(
                    f"{name}: scratch pooled macro AUC {shown['scratch_macro_auc']:.3f} (summary mean "
                    f"{shown['scratch_mean_auc_summary']:.3f}); over {len(shown['labels_compared'])} labels "
                    f"scratch {shown['scratch_mean_auc_compared']:.3f} vs pixel baseline "
                    f"{shown['baseline_mean_auc']:.3f}; {shown['seconds']:.0f} s"
                )
        if "faces" in args.only:
            found["faces_lfw15_probe"] = face_probe(Path(tmp) / "faces")
            shown = found["faces_lfw15_probe"]
            print(
                f"faces-lfw15 dlib probe: test accuracy {shown['accuracy']:.3f}, macro AUC {shown['macro_auc']:.3f}, "
                f"pixel baseline {shown['baseline_mean_auc']:.3f}; {shown['seconds']:.0f} s"
            )
    print(json.dumps(found))


if __name__ == "__main__":
    main()
