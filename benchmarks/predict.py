"""medlens end-to-end prediction over real NIH PNGs vs the model alone and vs torchxrayvision's documented path.

On the same ``--images`` files (default the first 64 of ``../shared/data/nih14/images``, 1024² greyscale
PNGs), each timed alternately with the others so a shared machine's load hits all alike:

- ``medlens predict``: ``predict_to_csv`` over the file paths (read, squash-resize, normalise, forward,
  CSV rows; decoding on threads beside the model), DenseNet-121 at 224 px, 1 channel, batch 32;
- model only (a): the same model's forward over the same images already preprocessed, as tensors in
  memory: the model-bound limit. Goal: medlens predict >= 0.9x of it;
- torchxrayvision (b): its README's path per image (``skimage.io.imread``, ``xrv.datasets.normalize(img,
  255)``, one channel, ``XRayCenterCrop``, ``XRayResizer(224)``, ``torch.from_numpy``, ``model(img[None])``)
  with ``xrv.models.DenseNet(weights=None)`` (random weights, nothing downloaded) in eval mode under
  no_grad, in a child process that never imports medlens (torch's and glibc's defaults, as its users run
  it). Goal: medlens predict >= 3x it. The same preprocessing fed to its model in batches of 32, kinder to
  it than its README, is timed too.

Both medlens rows are also run with the checkpoint exported to ONNX and ONNX Runtime forced; the backend
``auto`` picks for that export (what a checkpoint from ``medlens train``, which ends with the export, runs
on by default) is reported as ``default_backend`` with its ``default_vs_torchxrayvision``.
torchxrayvision is not a medlens dependency: the first run installs it and scikit-image with this
Python's pip into ``.bench-deps/`` at the repo root (git-ignored, outside the venv); if that fails the
comparison (b) is skipped with a message. Weights are random: speed does not depend on them.

    .venv/bin/python benchmarks/predict.py [--images 64] [--repeats 3]

The last line is one JSON object: ``vs_model_only``, ``vs_torchxrayvision`` (torch), ``default_backend``,
``default_vs_torchxrayvision`` and the images/s behind them.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import torch
from common import NIH_IMAGES, alternate, foreign_env, machine, random_checkpoint, rates, spread

from medlens.backends import choose_backend
from medlens.inference import NetworkModel, load_model
from medlens.jobs.export import export_onnx
from medlens.jobs.predict import predict_to_csv
from medlens.models.checkpoint import read_manifest
from medlens.runtime import apply_cpu_defaults

BENCH_DEPS = Path(__file__).resolve().parents[1] / ".bench-deps"
# --no-deps: torch, torchvision, numpy, scipy, pandas, requests and pillow come from the venv; these do not.
XRV_PACKAGES = ("torchxrayvision==1.5.7", "scikit-image==0.26.0", "imageio", "tifffile", "lazy-loader")
MODEL, SIZE, BATCH = "densenet121", 224, 32


def torchxrayvision() -> ModuleType | None:
    """torchxrayvision from .bench-deps, installed there on first use; None (with the reason) if impossible."""
    sys.path.insert(0, str(BENCH_DEPS))
    try:
        return importlib.import_module("torchxrayvision")
    except ImportError:
        pass
    print(f"installing {' '.join(XRV_PACKAGES)} into {BENCH_DEPS} (once; not a medlens dependency)")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(BENCH_DEPS)]
    done = subprocess.run([*command, *XRV_PACKAGES], capture_output=True, text=True)
    importlib.invalidate_caches()
    try:
        return importlib.import_module("torchxrayvision")
    except ImportError as exc:
        reason = done.stderr.strip().splitlines()[-1:] or [str(exc)]
        print(f"torchxrayvision could not be installed ({reason[0]}): comparison (b) skipped")
        return None


XRV_WORKER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import skimage.io, torch, torchvision, torchxrayvision as xrv

paths, batch, size = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = xrv.models.DenseNet(weights=None, num_classes=14).eval()
transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)])

def load(path):
    img = xrv.datasets.normalize(skimage.io.imread(path), 255)
    img = img[..., 0] if img.ndim == 3 else img  # one channel
    return torch.from_numpy(transform(img[None, ...]))

for _ in sys.stdin:
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            model(torch.stack([load(p) for p in paths[start : start + batch]]))
    print("done", flush=True)
"""


class XrvPath:
    """torchxrayvision's documented preprocessing and DenseNet-121 over ``paths``, ``batch`` at a time.

    It runs in a child process that never imports medlens, so it gets torch's and glibc's defaults as a
    user of torchxrayvision would, not medlens's CPU tuning; each call runs the whole list once there.
    """

    def __init__(self, paths: list[Path], batch: int):
        args = [str(BENCH_DEPS), json.dumps([str(p) for p in paths]), str(batch), str(SIZE)]
        env = foreign_env()
        self.child = subprocess.Popen(
            [sys.executable, "-c", XRV_WORKER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def __call__(self) -> None:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write("run\n")
        self.child.stdin.flush()
        if self.child.stdout.readline().strip() != "done":
            raise SystemExit(f"the torchxrayvision process failed (exit code {self.child.poll()})")

    def close(self) -> None:
        if self.child.stdin is not None:
            self.child.stdin.close()
        self.child.wait(timeout=60)


def medlens_paths(predictor: NetworkModel, paths: list[Path], scratch: Path) -> dict[str, Callable[[], None]]:
    """``medlens predict`` end to end, and the same model on the same images already in memory."""
    batches = [
        predictor.to_tensor([predictor.read(p) for p in paths[start : start + BATCH]])
        for start in range(0, len(paths), BATCH)
    ]
    runs = itertools.count()

    def end_to_end() -> None:
        out = scratch / f"predictions-{predictor.backend}-{next(runs)}.csv"  # a fresh file: re-runs resume
        predict_to_csv(predictor, paths, out, batch_size=BATCH, progress=False)

    def model_only() -> None:
        with torch.no_grad():
            for x in batches:
                predictor.forward(x)

    return {f"medlens predict ({predictor.backend})": end_to_end, f"model only ({predictor.backend})": model_only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="the first N NIH PNGs (default 64; 219 in all)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paths = sorted(NIH_IMAGES.glob("*.png"))[: args.images]
    if not paths:
        raise SystemExit(f"no PNGs in {NIH_IMAGES}: this benchmark needs ../shared/data")
    apply_cpu_defaults()
    xrv = torchxrayvision()
    with tempfile.TemporaryDirectory(prefix="medlens-bench-") as tmp:
        scratch = Path(tmp)
        checkpoint = random_checkpoint(scratch / "torch", MODEL, SIZE)
        exported = shutil.copytree(checkpoint, scratch / "onnx" / "best")
        export_onnx(exported, paths[:8], batch_size=BATCH, repeats=1)
        default = choose_backend(exported, read_manifest(exported))  # what `medlens train` + `predict` take: auto
        calls = medlens_paths(load_model(checkpoint, backend="torch"), paths, scratch)
        calls |= medlens_paths(load_model(exported, backend="onnxruntime"), paths, scratch)
        children = [XrvPath(paths, 1), XrvPath(paths, BATCH)] if xrv is not None else []
        if children:
            calls["torchxrayvision"], calls["torchxrayvision, batches of 32"] = children
        print(machine())
        print(f"{MODEL} at {SIZE} px, batch {BATCH}, {len(paths)} NIH PNGs (1024² greyscale), {args.repeats} repeats")
        try:
            seconds = alternate(calls, args.repeats)
        finally:
            for child in children:
                child.close()
    speed = {name: statistics.median(rates(s, len(paths))) for name, s in seconds.items()}
    print(f"\n{'':<34}{'images/s min/med/max':>24}")
    for name, s in seconds.items():
        print(f"{name:<34}{spread(rates(s, len(paths))):>24}")
    e2e, ort_e2e = speed["medlens predict (torch)"], speed["medlens predict (onnxruntime)"]
    figures = {
        "vs_model_only": round(e2e / speed["model only (torch)"], 3),
        "vs_torchxrayvision": round(e2e / speed["torchxrayvision"], 2) if xrv else None,
        "onnxruntime_vs_model_only": round(ort_e2e / speed["model only (onnxruntime)"], 3),
        "onnxruntime_vs_torchxrayvision": round(ort_e2e / speed["torchxrayvision"], 2) if xrv else None,
        "vs_torchxrayvision_batched": round(e2e / speed["torchxrayvision, batches of 32"], 2) if xrv else None,
        "default_backend": default,
        "default_vs_torchxrayvision": (
            round(speed[f"medlens predict ({default})"] / speed["torchxrayvision"], 2) if xrv else None
        ),
        **{f"img_s {name}": round(value, 1) for name, value in speed.items()},
    }
    print(
        f"\nmedlens predict: {figures['vs_model_only']:.2f}x the model alone (goal >= 0.9), "
        f"{figures['vs_torchxrayvision'] or float('nan'):.2f}x torchxrayvision (goal >= 3); a trained checkpoint "
        f"(exported at the end of training) predicts on {default}: "
        f"{figures['default_vs_torchxrayvision'] or float('nan'):.2f}x torchxrayvision"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
