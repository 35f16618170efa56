"""medlens's CPU defaults vs naive eager PyTorch: forward images/s at batch 1 and 32, in one run.

Each mode runs in its own process (the allocator setting is process-wide): "naive" is plain eager
PyTorch in a fresh process; "medlens" is the same model after `apply_cpu_defaults()` and channels_last,
as every medlens command does. Run from the repo root: `.venv/bin/python benchmarks/cpu_defaults.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import foreign_env, machine  # first: applies the CPU tuning before torch loads

MODELS = ("resnet50", "densenet121", "efficientnet_b0")
BATCHES = (1, 32)


def measure(mode: str, name: str, batch: int, repeats: int) -> list[float]:
    """Images/s of each repeat, after warm-up, in this process."""
    import torch

    from medlens.models import create_model

    if mode == "medlens":
        from medlens.models.inputs import to_channels_last
        from medlens.runtime import apply_cpu_defaults

        apply_cpu_defaults()
    model = create_model(name, num_classes=14, in_chans=1).eval()
    x = torch.randn(batch, 1, 224, 224)
    if mode == "medlens":
        model = to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)
    rates = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(x)
            if i >= 2:  # two warm-up passes
                rates.append(batch / (time.perf_counter() - start))
    return rates


def child(args: argparse.Namespace) -> None:
    print(json.dumps(measure(args.mode, args.model, args.batch, args.repeats)))


def run_mode(mode: str, name: str, batch: int, repeats: int) -> list[float]:
    env = {**os.environ}
    if mode == "naive":
        env = {**foreign_env(), "MEDLENS_NO_CPU_TUNING": "1"}
    command = [
        sys.executable,
        __file__,
        "--child",
        "--mode",
        mode,
        "--model",
        name,
        "--batch",
        str(batch),
        "--repeats",
        str(repeats),
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="medlens")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch  # noqa: F401  (so that the machine line names its version)

    print(machine())
    print(f"{'model':<16}{'batch':>6}{'naive img/s (min/med/max)':>30}{'medlens img/s (min/med/max)':>32}{'ratio':>8}")
    speedups: dict[str, dict[str, float]] = {}
    for name in args.models:
        for batch in BATCHES:
            repeats = args.repeats if batch > 1 else args.repeats * 4
            naive = run_mode("naive", name, batch, repeats)
            tuned = run_mode("medlens", name, batch, repeats)
            ratio = statistics.median(tuned) / statistics.median(naive)
            speedups.setdefault(f"bs{batch}", {})[name] = round(ratio, 2)

            def shown(rates: list[float]) -> str:
                return f"{min(rates):.1f}/{statistics.median(rates):.1f}/{max(rates):.1f}"

            print(f"{name:<16}{batch:>6}{shown(naive):>30}{shown(tuned):>32}{ratio:>7.2f}x")
    print(json.dumps({"speedup_bs32": speedups["bs32"], "speedup_bs1": speedups["bs1"]}))


if __name__ == "__main__":
    main()
