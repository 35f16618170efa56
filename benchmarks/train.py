"""Training from the preprocessing cache vs from memory, and what building the cache costs per core.

1. Cache build: the real NIH PNGs (1024² greyscale) decoded, resized to ``--size`` and stored, by
   ``build_cache`` with one worker in this process (one OpenCV thread, as the build's workers use). The
   files are listed ``--passes`` times, so chunks hold 14 rows instead of 4 and per-chunk bookkeeping
   weighs less (an NIH-size build's chunks hold 64 rows). Per core = images over the CPU seconds the
   build used, so other jobs' load on a shared machine does not count against it; images over wall-clock
   seconds are printed beside it. Goal: >= 120 images/s per core.
   The decode alone (+ resize) is also timed against OpenCV's libpng and PIL, the reader's fallbacks, alternately.
   Then one build over every core (``workers`` = cores), wall-clock, start-up of the worker processes included.
2. Training: the training loop's step (batch rows -> inputs -> augment -> forward, backward, AdamW step) on
   ``--model`` with its batches taken from the memory-mapped cache (uint8, normalised per batch, as
   ``medlens train`` does) or from float tensors already normalised in memory, timed in alternating
   segments of ``--steps`` steps. Goal: cache >= 0.9x memory.

    .venv/bin/python benchmarks/train.py [--images 219] [--model resnet18] [--size 256] [--repeats 5]

The last line is one JSON object: ``cache_vs_memory``, ``cache_build_img_s_per_core`` and the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import cv2
import numpy as np
import torch
from common import NIH_IMAGES, alternate, machine, rates, spread

from medlens.data import readers
from medlens.data.cache import build_cache
from medlens.data.transforms import resize_image
from medlens.models import create_model
from medlens.models.inputs import to_channels_last, to_input
from medlens.runtime import apply_cpu_defaults, available_cores
from medlens.training.batches import augment, epoch_order


def build_serial(paths: list[Path], out: Path, size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one single-process build."""
    wall, cpu = time.perf_counter(), time.process_time()
    build_cache(paths, out, size=size, workers=1, progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def build_parallel(paths: list[Path], out: Path, size: int) -> float:
    """Wall seconds of one build over every core (the workers' CPU time is out of sight: forkserver's children)."""
    wall = time.perf_counter()
    build_cache(paths, out, size=size, workers=available_cores(), progress=False)
    return time.perf_counter() - wall


def decode_paths(datas: list[bytes], size: int) -> dict[str, object]:
    """The reader as it is vs OpenCV's libpng and PIL's decoder (the reader's fallbacks), through the same resize."""

    def current() -> None:
        for data in datas:
            np.rint(resize_image(readers.read_image(data), size) * 255.0).astype(np.uint8)

    def opencv() -> None:
        for data in datas:
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) / np.float32(255)
            np.rint(resize_image(pixels, size) * 255.0).astype(np.uint8)

    def pil() -> None:
        for data in datas:
            pixels = readers._decode_raster(data, "benchmark", 1, readers.DEFAULT_MAX_PIXELS)
            np.rint(resize_image(pixels, size) * 255.0).astype(np.uint8)

    return {"reader (medlens PNG decoder)": current, "OpenCV decode (libpng)": opencv, "PIL decode": pil}


def cache_build(paths: list[Path], passes: int, size: int, repeats: int, work: Path) -> dict[str, float]:
    cv2.setNumThreads(1)
    files, paths = len(paths), paths * passes
    print(f"\n1. cache build: {files} NIH PNGs listed {passes} times ({len(paths)} rows) -> {size} px")
    walls, cpus = [], []
    for r in range(repeats):
        wall, cpu = build_serial(paths, work / f"serial{r}", size)
        walls.append(len(paths) / wall)
        cpus.append(len(paths) / cpu)
    print(f"   one process, img/s per CPU second (per core) min/med/max {spread(cpus)}; per wall s {spread(walls)}")
    datas = [p.read_bytes() for p in paths[:32]]
    timed = alternate(decode_paths(datas, size), repeats, clock=time.process_time)
    decode = {k: rates(v, len(datas)) for k, v in timed.items()}
    for name, values in decode.items():
        print(f"   decode + resize only, {name:<28} img/s per CPU second min/med/max {spread(values)}")
    wall = build_parallel(paths, work / "parallel", size)
    workers = available_cores()
    print(f"   {workers} worker processes: {len(paths) / wall:.1f} img/s wall-clock (worker start-up included)")
    new, opencv, pil = (statistics.median(v) for v in decode.values())
    return {
        "cache_build_img_s_per_core": round(statistics.median(cpus), 1),
        "cache_build_img_s_per_core_wall": round(statistics.median(walls), 1),
        "cache_build_img_s_all_cores": round(len(paths) / wall, 1),
        "decode_speedup_vs_pil": round(new / pil, 2),
        "decode_speedup_vs_opencv": round(new / opencv, 2),
    }


def training(cache_dir: Path, name: str, batch: int, steps: int, repeats: int) -> dict[str, float]:
    from medlens.data.cache import ImageCache

    cache = ImageCache(cache_dir)
    torch.manual_seed(0)
    model = to_channels_last(create_model(name, num_classes=14, in_chans=1)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (len(cache), 14)).astype(np.float32))
    in_memory = to_input(np.array(cache.images), model.mean, model.std)
    generator = torch.Generator().manual_seed(0)
    order = epoch_order(len(cache), 0, 0)

    def step(x: torch.Tensor, rows: np.ndarray) -> None:
        x = augment(x, "xray", 1.0, generator).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(x), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def batch_rows(k: int) -> np.ndarray:
        return np.sort(order[np.arange(k * batch, (k + 1) * batch) % len(order)])

    def from_cache() -> None:
        for k in range(steps):
            rows = batch_rows(k)
            step(to_input(cache.images[rows], model.mean, model.std), rows)

    def from_memory() -> None:
        for k in range(steps):
            rows = batch_rows(k)
            step(in_memory[rows], rows)

    def read_only() -> None:
        for k in range(50):
            to_input(cache.images[batch_rows(k)], model.mean, model.std)

    read_rate = rates(alternate({"read": read_only}, 3)["read"], 50 * batch)
    print(f"\n2. cache batches read + normalised (page cache warm): img/s min/med/max {spread(read_rate, 0)}")
    print(f"   training {name} at {cache.size} px, batch {batch}, {steps} steps per segment, {repeats} segments each")
    seconds = alternate({"cache": from_cache, "memory": from_memory}, repeats)
    speed = {k: rates(v, batch * steps) for k, v in seconds.items()}
    for mode, values in speed.items():
        print(f"   from {mode:<7} img/s min/med/max {spread(values)}")
    ratio = statistics.median(speed["cache"]) / statistics.median(speed["memory"])
    print(f"   cache / memory: {ratio:.3f}x (goal >= 0.9)")
    return {
        "cache_vs_memory": round(ratio, 3),
        "train_img_s_cache": round(statistics.median(speed["cache"]), 1),
        "train_img_s_memory": round(statistics.median(speed["memory"]), 1),
        "cache_read_img_s": round(statistics.median(read_rate)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=219, help="how many of the NIH PNGs (default all 219)")
    parser.add_argument(
        "--passes", type=int, default=4, help="list the files this many times, so chunks hold more rows (default 4)"
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    paths = sorted(NIH_IMAGES.glob("*.png"))[: args.images]
    if not paths:
        raise SystemExit(f"no PNGs in {NIH_IMAGES}: this benchmark needs ../shared/data")
    apply_cpu_defaults()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="medlens-bench-") as tmp:
        figures = cache_build(paths, args.passes, args.size, args.repeats, Path(tmp))
        figures |= training(Path(tmp) / "serial0", args.model, args.batch_size, args.steps, args.repeats)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
