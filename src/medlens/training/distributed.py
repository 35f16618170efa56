"""PyTorch's own DDP, as launched by ``torchrun``: process group, gathering, rank-0-only writes.

``torchrun --nproc-per-node N -m medlens train CONFIG --out RUN`` sets RANK / WORLD_SIZE / LOCAL_RANK;
without them medlens runs as one ordinary process. NCCL is used on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed() -> Dist:
    """Join the process group torchrun describes, or return a single-process description."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local_rank, device)


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


def gather_rows(ctx: Dist, tensor: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate equal-sized per-rank shards made by interleaving (rank::world), restoring row order."""
    if not ctx.enabled:
        return tensor[:n_total]
    parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
    dist.all_gather(parts, tensor.contiguous())
    stacked = torch.stack(parts, dim=1)  # row i of rank r was global row i*world + r
    return stacked.reshape(-1, *tensor.shape[1:])[:n_total]


def shutdown(ctx: Dist) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
