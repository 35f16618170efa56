"""How fast a user's mistake is answered: ``python -m medlens ...`` with a config, model or weights mistake.

Each mistake is found before any image is read (``tests/test_cli_errors.py`` shows that), so its answer costs
the process start, the imports and the check: the goal is under 5 s each on 2 cores. Runs each case
``--repeats`` times in a fresh process and prints the median seconds; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

CASES = {
    "unknown model": ["--set", "model.name=resnet5000"],
    "unknown key": ["--set", "train.lrr=1"],
    "strategy/last_n clash": ["--set", "model.strategy=full", "--set", "model.last_n=2"],
    "hub offline": ["--set", "model.pretrained=true"],
    "missing weights file": ["--set", "model.pretrained=/nowhere/w.safetensors"],
    "bad split": ["--set", "data.val_fraction=0.7", "--set", "data.test_fraction=0.5"],
}
GOAL_SECONDS = 5.0


def seconds(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medlens", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 1 or len(done.stderr.strip().splitlines()) != 1:
        raise SystemExit(f"{argv}: expected one error line and status 1, got {done.returncode}:\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "c.yaml").write_text("data:\n  source: phantoms\nmodel:\n  name: tiny\n")
        figures = {}
        for name, sets in CASES.items():
            argv = ["train", str(folder / "c.yaml"), "--out", str(folder / "run"), *sets]
            figures[name] = round(statistics.median(seconds(argv, folder) for _ in range(args.repeats)), 2)
            print(f"{name:<24} {figures[name]:6.2f} s")
    worst = max(figures.values())
    print(f"slowest {worst:.2f} s (goal {GOAL_SECONDS:.0f} s)")
    print(json.dumps({"seconds": figures, "max_s": worst, "within_goal": worst <= GOAL_SECONDS}))


if __name__ == "__main__":
    main()
