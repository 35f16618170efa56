"""torch eager (medlens's CPU defaults) vs ONNX Runtime on the same checkpoint: batch-1 latency, batch-32 throughput.

For each model a random-weight checkpoint (14 NIH labels, 224 px, 1 channel) is exported with
``medlens export``'s code (parity checked on 8 real NIH films), then both backends run the same
preprocessed real images through ``NetworkModel.forward``, alternately, so load on a shared machine hits both.

    .venv/bin/python benchmarks/backends.py [--models densenet121 resnet50 efficientnet_b0] [--repeats 5]

The last line is one JSON object: ``ort_vs_torch_bs32`` and ``ort_vs_torch_bs1`` (model -> ratio of median
images/s, > 1: ONNX Runtime faster), and ``export_choice`` (the backend each export recorded as faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import torch
from common import NIH_IMAGES, alternate, machine, random_checkpoint, rates, spread

from medlens.inference import load_model
from medlens.jobs.export import export_onnx
from medlens.runtime import apply_cpu_defaults

MODELS = ("densenet121", "resnet50", "efficientnet_b0")
SIZE = 224


def compare(name: str, images: list[Path], repeats: int, scratch: Path) -> tuple[dict[int, float], str]:
    """Median ORT/torch images/s per batch size, and which backend the export chose."""
    checkpoint = random_checkpoint(scratch / name, name, SIZE)
    report = export_onnx(checkpoint, images[:8], batch_size=32, repeats=2)
    on = {backend: load_model(checkpoint, backend=backend) for backend in ("torch", "onnxruntime")}
    prepared = on["torch"].to_tensor([on["torch"].read(p) for p in images[:32]])
    ratios = {}
    for batch in (1, 32):
        x = prepared[:batch]
        calls = {backend: (lambda p=p, x=x: p.forward(x)) for backend, p in on.items()}
        seconds = alternate(calls, repeats * (4 if batch == 1 else 1), warmup=2)
        speed = {backend: rates(s, batch) for backend, s in seconds.items()}
        ratios[batch] = statistics.median(speed["onnxruntime"]) / statistics.median(speed["torch"])
        print(
            f"{name:<16}{batch:>6}{spread(speed['torch']):>24}{spread(speed['onnxruntime']):>24}"
            f"{ratios[batch]:>8.2f}x{report.parity_max_abs_diff:>12.1e}"
        )
    return ratios, report.faster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    images = sorted(NIH_IMAGES.glob("*.png"))[:32]
    if len(images) < 32:
        raise SystemExit(f"fewer than 32 PNGs in {NIH_IMAGES}: this benchmark needs ../shared/data")
    apply_cpu_defaults()
    print(machine())
    print(f"random weights, {SIZE} px, 1 channel, real NIH films; images/s min/med/max")
    print(f"{'model':<16}{'batch':>6}{'torch':>24}{'onnxruntime':>24}{'ratio':>9}{'parity':>12}")
    bs1, bs32, chosen = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="medlens-bench-") as scratch, torch.no_grad():
        for name in args.models:
            ratios, chosen[name] = compare(name, images, args.repeats, Path(scratch))
            bs1[name], bs32[name] = round(ratios[1], 2), round(ratios[32], 2)
    print(json.dumps({"ort_vs_torch_bs32": bs32, "ort_vs_torch_bs1": bs1, "export_choice": chosen}))


if __name__ == "__main__":
    main()
