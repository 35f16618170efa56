"""Training batches: seeded batch order, rank shards, feeding the device, batch augmentation.

Images come from the preprocessing cache (decoded and resized once), so an epoch never decodes a PNG.
Augmentation runs on whole batches as tensors with an explicit generator: the same seed and epoch give
the same batches, which is what makes ``--resume`` end with the same weights as an unbroken run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTATIONS = ("xray", "face", "none")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of ``n`` rows for one epoch, the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s interleaved share of ``order``, padded by wrapping so every rank gets as many."""
    if world <= 1:
        return order
    per_rank = math.ceil(len(order) / world)
    return np.resize(order, per_rank * world)[rank::world]


def batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


Gather = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Table rows -> (uint8 images, float labels) of those rows, on the host."""


class DeviceBatches:
    """An epoch's batches on the device: each gathered from the memory-mapped cache on a helper thread while
    the one before trains, pinned where the device is a GPU, and copied to it without blocking the host.

    Batches travel as uint8 (a quarter of float32's bytes); normalisation and augmentation happen on the
    device. ``waited`` counts the seconds the loop spent waiting for a batch that was not ready.
    """

    def __init__(self, gather: Gather, chunks: Sequence[np.ndarray], device: torch.device):
        self.gather = gather
        self.chunks = list(chunks)
        self.device = device
        self.waited = 0.0

    def _host(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.gather(rows)
        x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        if not self.chunks:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlens-batches") as pool:
            ahead = pool.submit(self._host, self.chunks[0])
            for i, rows in enumerate(self.chunks):
                started = time.perf_counter()
                x, y = ahead.result()
                self.waited += time.perf_counter() - started
                if i + 1 < len(self.chunks):
                    ahead = pool.submit(self._host, self.chunks[i + 1])
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), rows


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator for random draws on ``device`` (the CPU's serves the CPU and the ``meta`` device)."""
    on = device.type if device.type in ("cuda", "mps") else "cpu"
    return torch.Generator(device=on).manual_seed(seed)


def augment(x: torch.Tensor, kind: str, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Small random affine + brightness/contrast; faces also flip. X-rays never flip: laterality matters.

    Every random number is drawn on ``x``'s device, with ``generator`` (see :func:`device_generator`)."""
    if kind == "none" or strength <= 0:
        return x
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator, device=x.device)

    angle = uniform(-7.0, 7.0) * strength * math.pi / 180
    scale = 1.0 + uniform(-0.08, 0.08) * strength
    shift = torch.stack([uniform(-0.05, 0.05), uniform(-0.05, 0.05)], dim=1) * strength * 2
    flip = torch.ones(b, device=x.device)
    if kind == "face":
        flip = torch.where(torch.rand(b, generator=generator, device=x.device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1.0 + uniform(-0.15, 0.15) * strength).view(b, 1, 1, 1)
    brightness = (uniform(-0.15, 0.15) * strength).view(b, 1, 1, 1)
    centre = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - centre) * contrast + centre + brightness
