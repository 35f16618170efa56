"""What a heatmap costs: each CAM method's time as a multiple of one forward pass, same model and image.

ResNet-50 at 224 px, batch 1, CPU, after warm-up; one CamExplainer per method kept alive between calls,
as the server keeps it. Prints the machine, a table (min / median / max over repeats) and, as the very last
line, one JSON object ``{"gradcam_vs_forward": ratio, ...}`` of median ratios. The goal is GradCAM <= 3x.

    .venv/bin/python benchmarks/cam.py [--model resnet50] [--size 224] [--repeats 10] [--methods gradcam ...]

Forward passes and heatmaps are timed alternately, so a shared machine's changing load hits both alike.
ScoreCAM runs one forward pass per feature channel (2048 for ResNet-50), so it is timed once, unwarmed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import torch
from common import machine

from medlens.explain.cam import CAM_METHODS, CamExplainer
from medlens.models import create_model
from medlens.models.inputs import to_channels_last
from medlens.runtime import apply_cpu_defaults

WARMUP = 2


def paired(
    forward: Callable[[], object], heatmap: Callable[[], object], repeats: int, warmup: int = WARMUP
) -> tuple[list[float], list[float]]:
    """Seconds per forward pass and per heatmap, timed alternately so a change in machine load hits both."""
    for _ in range(warmup):
        forward()
        heatmap()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for call, seconds in zip((forward, heatmap), times, strict=True):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(CAM_METHODS), choices=list(CAM_METHODS))
    args = parser.parse_args()

    apply_cpu_defaults()
    torch.manual_seed(0)
    model = to_channels_last(create_model(args.model, num_classes=14, in_chans=1).eval())
    x = torch.randn(1, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    print(machine())
    print(f"{args.model} at {args.size} px, batch 1, {args.repeats} repeats after {WARMUP} warm-up calls\n")

    def forward() -> None:
        with torch.no_grad():
            model(x)

    ratios = {}
    print(f"{'':<10}{'min ms':>9}{'median ms':>11}{'max ms':>9}{'forward ms':>12}{'x forward':>11}")
    for method in args.methods:
        with CamExplainer(model, method) as explainer:
            scorecam = method == "scorecam"
            forwards, heatmaps = paired(
                forward, lambda: explainer(x, 0), 1 if scorecam else args.repeats, 0 if scorecam else WARMUP
            )
        base, median = statistics.median(forwards), statistics.median(heatmaps)
        ratios[f"{method}_vs_forward"] = round(median / base, 3)
        print(
            f"{method:<10}{min(heatmaps) * 1e3:>9.1f}{median * 1e3:>11.1f}{max(heatmaps) * 1e3:>9.1f}"
            f"{base * 1e3:>12.1f}{median / base:>11.2f}"
        )
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
