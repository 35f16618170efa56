"""Fast CPU defaults, applied once by every command.

glibc returns every large freed block to the kernel by default, so each batch's activations are
page-faulted in anew; on a 2-core machine that halves throughput. Keeping freed memory in the heap
(no mmap for big blocks, no trimming) removes those faults. A heap that is never trimmed keeps the peak
of every malloc arena, and glibc opens up to eight arenas per core as threads contend (the server's
request threads), so the arenas are capped at one per core. channels_last helps convolutions on CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_applied = False


def apply_cpu_defaults() -> None:
    """Tune the allocator and threads for CPU work; safe to call many times, a no-op after the first."""
    global _applied
    if _applied:
        return
    _applied = True
    if os.environ.get("MEDLENS_NO_CPU_TUNING"):
        return
    cores = available_cores()
    _tune_glibc_malloc(arenas=cores)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cores // _local_world_size()))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def _tune_glibc_malloc(arenas: int) -> None:
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        ok = (
            libc.mallopt(_M_MMAP_MAX, 0)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            and libc.mallopt(_M_ARENA_MAX, arenas)
        )
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return
    if not ok:
        log.debug("mallopt refused the allocator settings; continuing with the defaults")


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """channels_last memory format for convolutional models (a no-op for token models)."""
    if any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        return module.to(memory_format=torch.channels_last)
    return module
