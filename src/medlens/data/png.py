"""A fast decoder for the PNGs chest films come as: 8-bit greyscale, not interlaced.

Decoding is most of what reading a film costs, whether the cache is being built or a request served. libpng
(behind OpenCV and PIL; no decoder on PyPI is faster) takes ~7 ms for a 1024² NIH film: ~3.5 ms inflating
the zlib stream and ~4 ms undoing the row filters. ISA-L inflates the same stream in ~1.5 ms and the filter
loop below, compiled by numba, undoes them in ~2 ms (``benchmarks/decode.py`` times the decoders alone,
``benchmarks/train.py`` decode + resize). With ``overlap=True`` a helper thread inflates while the caller
undoes the filters of the rows already there, so one image is done ~1.4 ms sooner; that is for answering one
image at a time (the server), since batch jobs already keep every core busy with an image each.

Uploads from anyone meet this code, and the fuzzer cannot instrument numba's, so the loop is memory-safe on
its own: numba checks every index (``boundscheck``; no cost measurable: 5.34 ms a film checked, 5.37
unchecked, 3.60 and 3.61 overlapped, libpng 8.19, in one run of ``benchmarks/decode.py``), an index out of
range raises IndexError and the file is declined. A loop compiled without the checks (``NUMBA_BOUNDSCHECK=0``,
or numba's cache of such a build) is found on first use and never trusted with a file.

The pixels are libpng's, bit for bit (tests compare every PNG in ../shared/data). Only files that follow the
format strictly take this path: checked chunk CRCs, consecutive IDAT chunks, an IEND, a zlib stream (its
Adler-32 checked) that inflates to exactly the rows the header declares, known filter types. Anything else
returns None, and the caller's general decoder reads the file or explains why it cannot.

ISA-L and numba come with the 'fast-png' extra (numba brings LLVM, ~200 MB). Without them every file is
declined, so OpenCV decodes it: the same pixels, about 1.6x slower to decode and resize.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import numba
    from isal import isal_zlib
except ImportError:  # no 'fast-png' extra: OpenCV decodes every PNG
    numba = isal_zlib = None

FAST = numba is not None
"""Whether this decoder is installed; when it is not, :func:`decode_grey8` declines every file."""

log = logging.getLogger(__name__)

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_HEAD = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")
CRITICAL_CHECKED = (b"IHDR", b"IDAT", b"IEND")
"""The chunks whose CRC is checked; libpng too refuses a damaged critical chunk and skips ancillary ones."""
MAX_DEFLATE_RATIO = 1032
"""Deflate cannot expand its input more than this (a 258-byte match per 2 bits, at best)."""
INFLATE_STEPS = 8
"""With ``overlap``, the filters of the rows inflated so far are undone after each eighth of the image."""


def _compiled(function: Callable[..., bool]) -> Callable[..., bool]:
    """``function`` compiled by numba (without the GIL, cached, every index checked) where the extra is installed."""
    return numba.njit(nogil=True, cache=True, boundscheck=True)(function) if FAST else function


class _Damaged(Exception):
    """The zlib stream is corrupt, or does not inflate to exactly the declared rows."""


def decode_grey8(data: bytes, overlap: bool = False) -> np.ndarray | None:
    """The (H, W) uint8 pixels of an 8-bit greyscale, non-interlaced PNG; None for any other or damaged file.

    ``overlap``: inflate on a helper thread while this one undoes the filters (see the module's notes).
    """
    if not FAST:
        return None
    found = _image_data(data)
    if found is None:
        return None
    width, height, stream = found
    size = height * (width + 1)  # a filter-type byte before every row
    if size > MAX_DEFLATE_RATIO * len(stream) + 64:
        return None  # more rows than the stream can hold: never allocate what a header merely declares
    if not _checks_bounds():
        return None
    raw = np.empty(size, dtype=np.uint8)
    pixels = np.empty((height, width), dtype=np.uint8)
    try:
        decode = _unfilter_while_inflating if overlap else _inflate_then_unfilter
        done = decode(stream, raw, pixels)
    except (_Damaged, isal_zlib.error, IndexError):  # IndexError: the filter loop's bounds check caught a bug of ours
        return None
    return pixels if done else None


def _inflate(stream: bytes, raw: np.ndarray, steps: int) -> Iterator[int]:
    """Inflate ``stream`` into ``raw`` in ``steps`` parts, yielding the bytes done after each.

    Never produces more than ``raw`` holds (a small stream can declare gigabytes); :class:`_Damaged` unless the
    stream ends, its checksum verified, exactly where ``raw`` does.
    """
    inflater = isal_zlib.decompressobj()
    step = -(-raw.size // steps)
    done, pending = 0, stream
    while done < raw.size:
        chunk = inflater.decompress(pending, min(step, raw.size - done))
        if not chunk:
            raise _Damaged("the stream ends before the last row")
        raw[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        done += len(chunk)
        pending = inflater.unconsumed_tail
        yield done
    if not inflater.eof and inflater.decompress(pending, 1):
        raise _Damaged("the stream holds more than the declared rows")
    if not inflater.eof or inflater.unused_data:
        raise _Damaged("the stream does not end after the last row")


def _inflate_then_unfilter(stream: bytes, raw: np.ndarray, pixels: np.ndarray) -> bool:
    """The whole stream inflated, then every row's filter undone, on this thread."""
    for _ in _inflate(stream, raw, steps=1):
        pass
    return _unfilter(raw, pixels, 0, len(pixels))


_inflaters: ThreadPoolExecutor | None = None
_inflaters_lock = threading.Lock()


def _forget_inflaters() -> None:
    """In a forked child: the parent's pool came without its threads, and work queued on it would never run."""
    global _inflaters, _inflaters_lock
    _inflaters, _inflaters_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inflaters)


def _unfilter_while_inflating(stream: bytes, raw: np.ndarray, pixels: np.ndarray) -> bool:
    """Undo the filters of each batch of rows as soon as a helper thread has inflated it."""
    global _inflaters
    with _inflaters_lock:
        if _inflaters is None:
            # Threads start only as callers overlap, so the bound (all CPUs) is never reached in practice;
            # callers beyond it would wait for a thread, never deadlock.
            _inflaters = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="medlens-inflate")
        pool = _inflaters
    progress: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()

    def inflate() -> None:
        try:
            for done in _inflate(stream, raw, INFLATE_STEPS):
                progress.put(done)
            progress.put(None)  # the whole stream inflated and verified
        except BaseException as exc:  # handed to the caller, which raises it
            progress.put(exc)

    height, width = pixels.shape
    try:
        pool.submit(inflate)
    except RuntimeError:  # the interpreter is shutting down: no new threads
        return _inflate_then_unfilter(stream, raw, pixels)
    rows = 0
    while (done := progress.get()) is not None:
        if isinstance(done, BaseException):
            raise done
        ready = done // (width + 1)
        if ready > rows:
            if not _unfilter(raw, pixels, rows, ready):
                return False  # the helper finishes inflating into ``raw``, which nothing else reads
            rows = ready
    return rows == height


def compile_now() -> None:
    """Compile the filter loop now rather than on the first image (~1 s; numba's cache makes it faster later)."""
    if FAST:
        _checks_bounds()


@functools.cache
def _checks_bounds() -> bool:
    """Whether the compiled filter loop raises on an index out of range; no upload meets it otherwise.

    ``NUMBA_BOUNDSCHECK=0`` compiles it without checks, and numba's cache, whose key leaves compile options out,
    then serves that build to later processes too.
    """
    backing = np.zeros(8, dtype=np.uint8)  # were the checks missing, the reads past ``raw`` would stay in here
    try:
        _unfilter(backing[:1], np.zeros((1, 4), dtype=np.uint8), 0, 1)
    except IndexError:
        return True
    log.warning(
        "8-bit greyscale PNGs go to libpng: medlens's filter loop was compiled without bounds checks "
        "(NUMBA_BOUNDSCHECK=0 now, or when numba cached it); unset it and delete png._unfilter-* in %s "
        "to use the faster decoder",
        _unfilter.stats.cache_path,
    )
    return False


def chunks_fit(data: bytes) -> bool:
    """Whether no chunk of a PNG declares more bytes than the file holds after it.

    OpenCV's PNG reader allocates what a chunk declares before reading it: a 4 GB length in an 89-byte file
    takes 4 GB (found by fuzzing). Only a complete chunk header counts; a file that simply stops is truncated,
    which every decoder reports on its own.
    """
    return all(end <= len(data) for _, _, end in _chunks(data))


def _chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, start of its data, end of its CRC) of each chunk with a complete header, up to IEND."""
    pos = len(SIGNATURE)
    while pos + _CHUNK_HEAD.size <= len(data):
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        end = pos + 12 + length
        yield kind, pos + 8, end
        if kind == b"IEND" or end > len(data):
            return
        pos = end


def _image_data(data: bytes) -> tuple[int, int, bytes] | None:
    """Width, height and the concatenated IDAT stream of a well-formed 8-bit greyscale PNG, else None."""
    if not data.startswith(SIGNATURE):
        return None
    view = memoryview(data)
    header, parts, idat_ended = None, [], False
    for kind, start, end in _chunks(data):
        if end > len(data):
            return None
        body = view[start : end - 4]
        if kind in CRITICAL_CHECKED and zlib.crc32(body, zlib.crc32(kind)) != int.from_bytes(view[end - 4 : end]):
            return None
        if header is None:
            if kind != b"IHDR" or len(body) != _IHDR.size:
                return None
            width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack(body)
            if (depth, colour, compression, filtering, interlace) != (8, 0, 0, 0, 0) or not width or not height:
                return None
            header = (width, height)
        elif kind == b"IDAT":
            if idat_ended:
                return None  # the format wants IDAT chunks back to back
            parts.append(body)
        elif kind == b"IEND":
            stream = b"".join(parts)
            return (*header, stream) if _zlib_header_ok(stream) else None
        elif not kind.isalpha() or kind[:1].isupper():
            return None  # a malformed type, or a critical chunk greyscale has no use for (PLTE, a second IHDR...)
        else:
            idat_ended = bool(parts)
    return None  # no IEND: truncated


def _zlib_header_ok(stream: bytes) -> bool:
    """Deflate with a window of at most 32 KB, a valid check and no preset dictionary, as PNG and libpng require
    (ISA-L would accept a larger window)."""
    if len(stream) < 2:
        return False
    method, flags = stream[0], stream[1]
    return method & 0x0F == 8 and method >> 4 <= 7 and (method << 8 | flags) % 31 == 0 and not flags & 0x20


@_compiled
def _unfilter(raw: np.ndarray, out: np.ndarray, first: int, stop: int) -> bool:
    """Undo the PNG row filters of rows ``first`` to ``stop`` (one byte per pixel), rows above already done.

    ``raw`` holds H rows of (type byte, W bytes). False for an unknown filter type. Every index is checked
    (``boundscheck``): arrays whose sizes disagree raise :class:`IndexError`, whatever the caller passes.
    """
    width = out.shape[1]
    above = np.zeros(width, dtype=np.uint8)
    for y in range(first, stop):
        start = y * (width + 1) + 1
        kind = raw[start - 1]
        row = out[y]
        if y > 0:
            above = out[y - 1]
        if kind == 0:  # None; copied by index, so that past the end of ``raw`` it raises IndexError like the rest
            for i in range(width):
                row[i] = raw[start + i]
        elif kind == 1:  # Sub: plus the pixel to the left
            left = 0
            for i in range(width):
                left = (np.int32(raw[start + i]) + left) & 255
                row[i] = left
        elif kind == 2:  # Up: plus the pixel above
            for i in range(width):
                row[i] = raw[start + i] + above[i]
        elif kind == 3:  # Average of left and above, rounded down
            left = 0
            for i in range(width):
                left = (np.int32(raw[start + i]) + ((left + np.int32(above[i])) >> 1)) & 255
                row[i] = left
        elif kind == 4:  # Paeth: whichever of left, above, upper-left is nearest left + above - upper-left
            left = 0
            corner = 0
            for i in range(width):
                up = np.int32(above[i])
                to_left, to_up, to_corner = abs(up - corner), abs(left - corner), abs(left + up - 2 * corner)
                if to_left <= to_up and to_left <= to_corner:
                    guess = left
                elif to_up <= to_corner:
                    guess = up
                else:
                    guess = corner
                left = (np.int32(raw[start + i]) + guess) & 255
                row[i] = left
                corner = up
        else:
            return False
    return True
