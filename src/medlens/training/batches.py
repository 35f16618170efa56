"""Training batches: seeded batch order, rank shards, batch augmentation.

Images come from the preprocessing cache (decoded and resized once), so an epoch never decodes a PNG.
Augmentation runs on whole batches as tensors with an explicit generator: the same seed and epoch give
the same batches, which is what makes ``--resume`` end with the same weights as an unbroken run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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


def augment(x: torch.Tensor, kind: str, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Small random affine + brightness/contrast; faces also flip. X-rays never flip: laterality matters."""
    if kind == "none" or strength <= 0:
        return x
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    angle = uniform(-7.0, 7.0) * strength * math.pi / 180
    scale = 1.0 + uniform(-0.08, 0.08) * strength
    shift = torch.stack([uniform(-0.05, 0.05), uniform(-0.05, 0.05)], dim=1) * strength * 2
    flip = torch.ones(b)
    if kind == "face":
        flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
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
