"""CPU tuning for the whole process, applied only when asked: by the ``medlens`` command, or by a library user.

Importing medlens, or loading a checkpoint, changes nothing in the process. ``medlens`` (the command) calls
:func:`apply_cpu_defaults` first thing; a notebook or a service that wants the same speed calls it too,
before it imports torch (the OpenMP wait policy is read when torch loads). ``MEDLENS_NO_CPU_TUNING=1``
turns it off. What it does:

- OpenMP's wait policy: torch's idle OpenMP workers spin ~30 us instead of libgomp's default ~3 ms, which
  makes small models many times slower on a busy CPU yet falls to ~100 spins once a process holds more
  OpenMP threads than cores (the server's model thread beside request threads); passive waiting made
  batch-1 ResNet-50 35% and DenseNet-121 1.7x slower. ``ACTIVE`` with an explicit spin count spins ~30 us in
  every case; Intel's and LLVM's OpenMP would spin forever under ``ACTIVE`` unless ``KMP_BLOCKTIME`` (ms)
  bounds it. Set ``OMP_WAIT_POLICY`` yourself to keep your own.
- glibc's allocator: by default it returns every large freed block to the kernel, so each batch's
  activations are page-faulted in anew; on a 2-core machine that halves throughput. Keeping freed memory
  in the heap (no mmap for big blocks, no trimming) removes those faults. A heap that is never trimmed keeps
  the peak of every malloc arena, and glibc opens up to eight arenas per core as threads contend (the
  server's request threads), so the arenas are capped at one per core.
- torch's intra-op threads: one per core available to this process (divided among the ranks of a node),
  through ``OMP_NUM_THREADS`` when torch is not loaded yet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

OFF_ENV = "MEDLENS_NO_CPU_TUNING"
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "1"}

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_applied = False


def apply_cpu_defaults() -> None:
    """Tune OpenMP, the allocator and torch's threads for CPU work; safe to call many times (a no-op after the
    first). Call it before importing torch for the OpenMP part to take effect."""
    global _applied
    if _applied:
        return
    _applied = True
    if os.environ.get(OFF_ENV):
        return
    if "OMP_WAIT_POLICY" not in os.environ:
        if "torch" in sys.modules:
            log.debug("torch is already loaded: the OpenMP wait policy stays as it is")
        else:
            for name, value in OPENMP_DEFAULTS.items():
                os.environ.setdefault(name, value)
    cores = available_cores()
    _tune_glibc_malloc(arenas=cores)
    if "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, cores // _local_world_size())
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        else:  # read when torch loads; the command's own errors then come without the cost of loading it
            os.environ["OMP_NUM_THREADS"] = str(threads)


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
