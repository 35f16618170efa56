"""Training and prediction on a GPU, through the same loop, engine and loaded model as ``medlens train/predict``.

For a machine with a CUDA GPU. Trains ``tiny`` and ``densenet121`` at 224 px on phantoms (cached as uint8,
fed by :class:`medlens.training.batches.DeviceBatches`) for ``--steps`` optimiser steps each in fp32 and bf16
(or fp16 where a GPU has no bf16), then, where there are several GPUs, DenseNet-121 in bf16 on all of them
under ``torchrun``. Prints training images/s, the share of each epoch the loop waited for data, peak GPU
memory, and ``medlens predict`` images/s end to end over 1024 x 1024 PNG files (decoded on the host's cores
beside the GPU). Its last line is one JSON object: ``device``, ``train_img_s``, ``data_wait_share``,
``peak_mem_gb``, ``predict_img_s`` (DenseNet-121, the fastest precision on one GPU), and the per-run figures.
Without a GPU it prints ``{"skipped": "no CUDA device"}`` and exits 0; ``--device cpu`` with few ``--steps``
runs the same path on the CPU, to check the script itself.

Goals on one H100/H200: DenseNet-121 at 224 px in bf16, at least 2,500 training images/s with the data wait
under 10% of a step; predict at least 2,000 images/s from 1024 x 1024 PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import numpy as np
import torch
from common import machine, random_checkpoint

from medlens.config import load_config
from medlens.training.data import prepare_data
from medlens.training.engine import resolve_precision, start_engine
from medlens.training.fit import start, train_epoch

MODELS = ("tiny", "densenet121")
SIZE = 224
GOALS = {"train_img_s": 2500, "data_wait_share": 0.10, "predict_img_s": 2000}


def phantom_run(scratch: Path, n: int) -> Path:
    """A folder of ``n`` phantoms (256 px) and their preprocessing cache at 224 px, shared by every run."""
    from medlens.data.phantoms import generate_phantoms

    folder = scratch / "phantoms"
    if not (folder / "BBox_List_2017.csv").exists():
        generate_phantoms(folder, n=n, task="multilabel", size=256, seed=0, progress=False)
    return folder


def train_rate(scratch: Path, model: str, precision: str, device: str, steps: int, batch: int, n: int) -> dict:
    """Images/s, data-wait share and peak memory of ``steps`` optimiser steps, after a warm-up epoch."""
    source = phantom_run(scratch, n)
    overrides = [
        f"data.source={source}", f"data.cache={scratch / 'cache'}", f"data.image_size={SIZE}", f"model.name={model}",
        f"train.batch_size={batch}", "train.optimizer=adam", "train.lr=1e-4", f"train.precision={precision}",
        f"train.device={device}", "train.export_onnx=false", "data.val_fraction=0.05", "data.test_fraction=0.0",
    ]  # fmt: skip
    config = load_config(None, overrides)
    engine = start_engine(config.train.device, config.train.precision)
    run_dir = scratch / f"run-{model}-{precision}-{engine.rank}"
    run_dir.mkdir(exist_ok=True)
    data = prepare_data(config, run_dir, engine)
    state = start(config, run_dir, data, engine, resume=False)
    per_epoch = len(data.splits["train"]) // batch
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    train_epoch(config, state, data, engine, 0, progress=False)  # warm-up: cuDNN autotuning, allocator
    images = seconds = waited = 0.0
    epoch = 1
    while images < steps * batch * engine.world:
        train_epoch(config, state, data, engine, epoch, progress=False)
        images += per_epoch * batch * engine.world
        seconds += state.epoch_seconds
        waited += state.data_wait_seconds
        epoch += 1
    peak = torch.cuda.max_memory_allocated(engine.device) / 2**30 if engine.device.type == "cuda" else float("nan")
    return {
        "model": model,
        "precision": engine.precision,
        "processes": engine.world,
        "device": engine.describe(),
        "train_img_s": round(images / seconds, 1),
        "data_wait_share": round(waited / seconds, 4),
        "peak_mem_gb": round(peak, 2),
    }


def predict_rate(scratch: Path, device: str, n: int, batch: int) -> float:
    """``medlens predict`` images/s over ``n`` 1024 x 1024 PNGs with a DenseNet-121 checkpoint on ``device``."""
    import cv2

    from medlens.inference import load_model
    from medlens.jobs.predict import predict_to_csv
    from medlens.runtime import available_cores

    films = scratch / "films"
    films.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 256, (1024, 1024), dtype=np.uint8), (0, 0), 8)
    for i in range(n):  # smooth grey films of a chest film's size and entropy, each different
        cv2.imwrite(str(films / f"{i:05d}.png"), np.roll(base, i * 7, axis=i % 2))
    checkpoint = random_checkpoint(scratch / "ckpt", "densenet121", SIZE)
    model = load_model(checkpoint, backend="torch", device=device)
    workers = max(2, available_cores())
    predict_to_csv(model, [films], scratch / "warm.csv", batch, workers=workers, progress=False)
    started = time.perf_counter()
    predict_to_csv(model, [films], scratch / "p.csv", batch, workers=workers, progress=False)
    return n / (time.perf_counter() - started)


def ddp_child(args: argparse.Namespace) -> None:
    """One rank of the multi-GPU run; rank 0 prints the JSON line."""
    found = train_rate(Path(args.scratch), "densenet121", args.precision, "cuda", args.steps, args.batch, args.n)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps timed per run (default 60)")
    parser.add_argument("--batch", type=int, default=256, help="global batch size (default 256)")
    parser.add_argument("--n", type=int, default=1536, help="phantoms to train on (default 1536)")
    parser.add_argument("--films", type=int, default=1024, help="1024 px PNGs to predict (default 1024)")
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_child:
        ddp_child(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    print(machine())
    half = resolve_precision("auto", torch.device(args.device)) if args.device.startswith("cuda") else "bf16"
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for model in MODELS:
            for precision in ("32", half):
                found = train_rate(folder, model, precision, args.device, args.steps, args.batch, args.n)
                runs.append(found)
                print(
                    f"{model:<12} {found['precision']:>4}  {found['train_img_s']:>9.1f} img/s  data wait "
                    f"{found['data_wait_share']:.1%}  peak {found['peak_mem_gb']:.2f} GB"
                )
        gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
        if gpus > 1:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__,
                "--ddp-child", f"--scratch={folder}", f"--precision={half}", f"--steps={args.steps}",
                f"--batch={args.batch}", f"--n={args.n}",
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(found)
            print(f"densenet121 on {gpus} GPUs ({found['precision']}): {found['train_img_s']:.1f} img/s in all")
        predict_img_s = predict_rate(folder, args.device, args.films, batch=128)
        print(f"predict: {predict_img_s:.1f} img/s end to end from 1024 px PNGs")
    single = [r for r in runs if r["model"] == "densenet121" and r["processes"] == 1]
    best = max(single, key=lambda r: r["train_img_s"])
    summary = {
        "device": best["device"],
        "train_img_s": best["train_img_s"],
        "data_wait_share": best["data_wait_share"],
        "peak_mem_gb": best["peak_mem_gb"],
        "predict_img_s": round(predict_img_s, 1),
        "goals": GOALS,
        "runs": runs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
