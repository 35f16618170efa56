"""Where training runs: the device, the precision and the process group, delegated to Lightning Fabric.

medlens's loop stays its own (:mod:`medlens.training.fit`); Fabric, whose GPU, mixed-precision and
multi-node paths its maintainers test on GPUs, places the model, wraps it in DDP, joins the process group
(NCCL on GPUs, gloo on CPU) and applies the precision: autocast in the model's forward, a gradient scaler
for fp16. ``torchrun --nproc-per-node N -m medlens train ...`` (``--nnodes`` and a rendezvous for several
machines) sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; without them medlens runs as one process
on the chosen device. One code path either way.

Devices: ``auto`` (CUDA, then Apple's MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
Precisions: ``auto`` (bf16 autocast on CUDA GPUs that support it, fp16 with a gradient scaler on those that
don't, fp32 on CPU and MPS), ``32``, ``bf16`` (also on CPU, by choice), ``16``. Weights stay fp32.

An :class:`Engine` without Fabric (``Engine(device=...)``) runs the same step plainly on any device,
PyTorch's ``meta`` device included: that is how the tests prove the step device-clean without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medlens.errors import OutOfMemory, UsageError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("auto", "32", "bf16", "16")
_FABRIC_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def available_devices() -> list[str]:
    """The devices this machine has, as ``--device`` names them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(wanted: str = "auto", local_rank: int = 0) -> torch.device:
    """The device ``wanted`` names (``auto``: CUDA, then MPS, then CPU); under torchrun, CUDA is the rank's GPU.

    :class:`UsageError` naming what is available when the device is not there.
    """
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise UsageError(f"unknown device {wanted!r}: choose one of {', '.join(DEVICES)}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if str(device) not in available_devices() and device.type != "meta":
        raise UsageError(f"device {wanted!r} is not available here; this machine has: {', '.join(available_devices())}")
    return device


def resolve_precision(wanted: str, device: torch.device) -> str:
    """``32``, ``bf16`` or ``16`` for ``wanted`` on ``device`` (see the module docstring for ``auto``)."""
    if wanted not in PRECISIONS:
        raise UsageError(f"unknown precision {wanted!r}: choose one of {', '.join(PRECISIONS)}")
    if wanted == "auto":
        if device.type != "cuda":
            return "32"
        return "bf16" if torch.cuda.is_bf16_supported() else "16"
    if wanted == "16" and device.type == "cpu":
        raise UsageError("fp16 training needs a GPU; on the CPU use train.precision: bf16 or 32")
    return wanted


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision, None for fp32."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)


@dataclass
class Engine:
    """One process's part of a run: its device, precision, rank, and the Fabric that joins them (if any)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "32"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fabric: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether several processes train together."""
        return self.world > 1

    def setup_module(self, model: nn.Module) -> nn.Module:
        """``model`` on the device, as the step calls it (under DDP, and with the precision's autocast)."""
        if self.fabric is None:
            return model.to(self.device)
        return self.fabric.setup_module(model)

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer if self.fabric is None else self.fabric.setup_optimizers(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (scaled first under fp16)."""
        if self.fabric is None:
            loss.backward()
        else:
            self.fabric.backward(loss)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The precision's autocast, for forward passes outside the module the engine set up (validation)."""
        dtype = autocast_dtype(self.precision)
        if dtype is None or self.device.type == "meta":
            yield
        else:
            with torch.autocast(self.device.type, dtype=dtype):
                yield

    def gather_rows(self, tensor: torch.Tensor, n_total: int) -> torch.Tensor:
        """Concatenate equal-sized per-rank shards made by interleaving (rank::world), restoring row order."""
        if not self.enabled:
            return tensor[:n_total]
        parts = self.fabric.all_gather(tensor.contiguous())  # (world, rows, ...)
        return parts.transpose(0, 1).reshape(-1, *tensor.shape[1:])[:n_total]

    def sum_across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if not self.enabled else self.fabric.all_reduce(tensor, reduce_op="sum")

    def barrier(self) -> None:
        if self.enabled:
            self.fabric.barrier()

    def describe(self) -> str:
        """``cuda:0 (NVIDIA H200), precision bf16, 8 processes``: what the run trains on, said at its start."""
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        ranks = f", {self.world} processes" if self.enabled else ""
        return f"{where}, precision {self.precision}{ranks}"


def start_engine(device: str = "auto", precision: str = "auto") -> Engine:
    """The engine of this process: one device, or this rank's part of a torchrun group."""
    from lightning_fabric import Fabric

    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    chosen_precision = resolve_precision(precision, chosen)
    if world > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        fabric = Fabric(
            accelerator=chosen.type,
            devices=per_node,
            num_nodes=max(world // per_node, 1),
            strategy="ddp",
            precision=_FABRIC_PRECISION[chosen_precision],
        )
    else:
        devices = [chosen.index] if chosen.type == "cuda" else 1
        fabric = Fabric(accelerator=chosen.type, devices=devices, precision=_FABRIC_PRECISION[chosen_precision])
    fabric.launch()
    return Engine(fabric.device, chosen_precision, fabric.global_rank, fabric.world_size, fabric.local_rank, fabric)


def memory_text(device: torch.device) -> str:
    """``cuda:0 (80.0 GB, 1.2 GB free)``: the device and its memory, for an out-of-memory message."""
    if device.type != "cuda":
        return str(device)
    free, total = torch.cuda.mem_get_info(device)
    return f"{device} ({total / 2**30:.1f} GB, {free / 2**30:.1f} GB free)"


def fitting_batch_size(runs: Callable[[int], None], failed: int) -> int | None:
    """The largest batch size below ``failed``, halving, for which ``runs(size)`` does not run out of device
    memory; None when even 1 does not fit."""
    size = failed // 2
    while size >= 1:
        _release_cached_memory()
        try:
            runs(size)
            return size
        except torch.OutOfMemoryError:
            size //= 2
    return None


def out_of_memory(device: torch.device, failed: int, fits: int | None, advice: str) -> OutOfMemory:
    """The one-line error: what did not fit where, what does, and how to go on."""
    where = memory_text(device)
    if fits is None:
        return OutOfMemory(f"out of memory on {where} even at batch size 1: use a smaller model or image size")
    return OutOfMemory(f"out of memory at batch size {failed} on {where}; batch size {fits} fits: {advice}")


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shutdown(engine: Engine) -> None:
    if engine.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
