"""The fast 8-bit greyscale PNG decoder: libpng's pixels exactly, and None for anything it should not take."""

from __future__ import annotations

import base64
import functools
import itertools
import os
import signal
import struct
import time
import zlib

import cv2
import numba
import numpy as np
import pytest
from PIL import Image

from medlens.data import png, readers
from medlens.data.png import SIGNATURE, _image_data, _unfilter, chunks_fit, decode_grey8
from medlens.data.readers import load_image
from medlens.errors import ImageReadError


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _paeth(left: int, up: int, corner: int) -> int:
    guess = left + up - corner
    near = min((abs(guess - left), 0), (abs(guess - up), 1), (abs(guess - corner), 2))[1]
    return (left, up, corner)[near]


def _filtered(pixels: np.ndarray, kinds: list[int]) -> bytes:
    """The raw scanlines of ``pixels`` with row ``y`` filtered by ``kinds[y]``, as the PNG spec defines them."""
    rows = []
    above = np.zeros(pixels.shape[1], dtype=np.int64)
    for row, kind in zip(pixels.astype(np.int64), kinds, strict=True):
        left = np.concatenate([[0], row[:-1]])
        corner = np.concatenate([[0], above[:-1]])
        predicted = {
            0: np.zeros_like(row),
            1: left,
            2: above,
            3: (left + above) // 2,
            4: np.array([_paeth(*abc) for abc in zip(left, above, corner, strict=True)]),
        }[kind]
        rows.append(bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
        above = row
    return b"".join(rows)


def _png(
    pixels: np.ndarray,
    kinds: list[int] | None = None,
    raw: bytes | None = None,
    idat_parts: int = 1,
    header: tuple[int, int, int, int, int] = (8, 0, 0, 0, 0),
    between: bytes = b"",
    end: bool = True,
    stream: bytes | None = None,
    extra: bytes = b"",
) -> bytes:
    """A PNG of ``pixels`` written by hand, so each filter type and each kind of damage can be chosen.

    ``raw``: the scanlines to compress instead; ``stream``: the zlib stream itself; ``extra``: chunks after IHDR.
    """
    height, width = pixels.shape
    kinds = kinds if kinds is not None else [y % 5 for y in range(height)]
    if stream is None:
        stream = zlib.compress(raw if raw is not None else _filtered(pixels, kinds))
    cut = [len(stream) * i // idat_parts for i in range(idat_parts + 1)]
    idats = [_chunk(b"IDAT", stream[a:b]) for a, b in itertools.pairwise(cut)]
    data = SIGNATURE + _chunk(b"IHDR", struct.pack(">II", width, height) + bytes(header)) + extra
    data += _chunk(b"gAMA", struct.pack(">I", 45455)) + idats[0] + between + b"".join(idats[1:])
    return data + (_chunk(b"IEND", b"") if end else b"")


def _zlib_header(stream: bytes, method: int, dictionary: bool = False) -> bytes:
    """``stream`` with its first byte (method and window) replaced, the check bits made valid again."""
    flags = (stream[1] & 0xC0) | (0x20 if dictionary else 0)
    flags |= (31 - (method << 8 | flags) % 31) % 31
    return bytes([method, flags]) + stream[2:]


@pytest.fixture(params=[False, True], ids=["one thread", "overlapped"])
def decode(request):
    """The decoder on the caller's thread alone, and with a helper thread inflating beside it."""
    return functools.partial(decode_grey8, overlap=request.param)


@pytest.fixture
def pixels() -> np.ndarray:
    # Smooth ramps plus noise: every filter type meets carries, both halves of Average and all three Paeth choices.
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(37) * 7, np.arange(53) * 3)
    return ((ramp + rng.integers(0, 60, ramp.shape)) % 256).astype(np.uint8)


@pytest.mark.parametrize("kind", range(5))
def test_each_filter_type_decodes_to_the_pixels(decode, pixels, kind):
    assert np.array_equal(decode(_png(pixels, [kind] * len(pixels))), pixels)


def test_mixed_filters_split_idat_and_ancillary_chunks_decode_like_libpng(decode, pixels):
    data = _png(pixels, idat_parts=4)
    decoded = decode(data)
    assert np.array_equal(decoded, pixels)
    assert np.array_equal(decoded, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED))


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (2, 2)])
def test_edge_shapes(decode, shape):
    image = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    assert np.array_equal(decode(_png(image)), image)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_files_from_opencv_and_pil_decode_exactly(decode, pixels, level, tmp_path):
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, level])
    assert ok and np.array_equal(decode(encoded.tobytes()), pixels)
    Image.fromarray(pixels).save(tmp_path / "pil.png", compress_level=level, optimize=level == 9)
    assert np.array_equal(decode((tmp_path / "pil.png").read_bytes()), pixels)


def _damaged(pixels: np.ndarray) -> dict[str, bytes]:
    good = _png(pixels)
    idat = good.index(b"IDAT")
    (length,) = struct.unpack(">I", good[idat - 4 : idat])
    bad_crc = bytearray(good)
    bad_crc[idat + 4 + length] ^= 0xFF  # the CRC itself: the chunk's data and the stream stay intact
    raw = _filtered(pixels, [0] * len(pixels))
    unknown_filter = bytes([5]) + raw[1:]
    stream = zlib.compress(raw)
    bad_adler = stream[:-1] + bytes([stream[-1] ^ 0xFF])
    return {
        "bad IDAT CRC": bytes(bad_crc),
        "bad Adler-32": _png(pixels, stream=bad_adler),
        "data after the zlib stream": _png(pixels, stream=stream + b"\x03\x00"),
        "zlib window over 32 KB": _png(pixels, stream=_zlib_header(stream, 0x88)),
        "zlib preset dictionary": _png(pixels, stream=_zlib_header(stream, 0x78, dictionary=True)),
        "unknown critical chunk": _png(pixels, extra=_chunk(b"ABCD", b"x")),
        "second IHDR": _png(pixels, extra=_chunk(b"IHDR", good[16:29])),
        "PLTE in a greyscale file": _png(pixels, extra=_chunk(b"PLTE", bytes(3))),
        "chunk type not letters": _png(pixels, extra=_chunk(b"ab1d", b"")),
        "no IEND (truncated)": _png(pixels, end=False),
        "cut inside a chunk": good[: idat + 20],
        "IDAT chunks not consecutive": _png(pixels, idat_parts=2, between=_chunk(b"tEXt", b"a\x00b")),
        "filter type 5": _png(pixels, raw=unknown_filter),
        "stream one byte short": _png(pixels, raw=raw[:-1]),
        "stream one byte long": _png(pixels, raw=raw + b"\x00"),
        "16-bit": _png(pixels, header=(16, 0, 0, 0, 0)),
        "interlaced": _png(pixels, header=(8, 0, 0, 0, 1)),
        "RGB": _png(pixels, header=(8, 2, 0, 0, 0)),
        "not a PNG": b"GIF89a" + good[6:],
        "zero width": _png(np.zeros((3, 0), np.uint8), raw=b"\x00" * 3),
    }


@pytest.mark.parametrize("problem", list(_damaged(np.zeros((4, 4), np.uint8))))
def test_anything_not_strictly_well_formed_is_left_to_the_general_decoder(decode, pixels, problem):
    assert decode(_damaged(pixels)[problem]) is None


def test_the_damage_cases_are_each_one_defect_of_a_good_file(decode, pixels):
    # The same builders with nothing wrong decode, so each case above fails for its own defect.
    stream = zlib.compress(_filtered(pixels, [0] * len(pixels)))
    assert np.array_equal(decode(_png(pixels, stream=_zlib_header(stream, 0x78))), pixels)
    assert np.array_equal(decode(_png(pixels, extra=_chunk(b"vpAg", b"x"))), pixels)  # unknown, ancillary


@pytest.mark.parametrize("overlap", [False, True])
def test_a_declined_file_still_reads_or_fails_as_the_general_decoders_say(pixels, overlap):
    damaged = _damaged(pixels)
    # Every row is there: libpng reads a file without IEND, and PIL one whose IDAT CRC is wrong (it skips them).
    for problem in ("no IEND (truncated)", "bad IDAT CRC"):
        read = load_image(damaged[problem], overlap=overlap).pixels
        assert np.array_equal(read, pixels / np.float32(255)), problem
    broken = bytearray(_png(pixels))
    broken[broken.index(b"IDAT") + 10] ^= 0xFF  # inside the compressed rows: no decoder can read them
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        load_image(bytes(broken), overlap=overlap)


def test_without_the_fast_png_extra_opencv_reads_the_same_pixels(monkeypatch, pixels):
    monkeypatch.setattr(png, "FAST", False)
    data = _png(pixels)
    assert decode_grey8(data) is None
    assert np.array_equal(load_image(data).pixels, pixels / np.float32(255))


def test_every_real_grey_png_decodes_exactly_as_libpng(decode, shared_data):
    taken = 0
    for path in sorted(shared_data.rglob("*.png")):
        data = path.read_bytes()
        decoded = decode(data)
        if decoded is None:
            assert data[24:26] != b"\x08\x00", f"{path}: an 8-bit greyscale PNG was left to the general decoder"
            continue
        assert np.array_equal(decoded, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)), path
        taken += 1
    assert taken >= 250  # the 219 NIH films and the greyscale half of cxr4


def test_random_scanlines_and_filter_bytes_decode_as_libpng_or_are_declined(decode):
    # Well-formed wrappers (CRCs, zlib) around random rows and random filter bytes, some invalid (5-255):
    # whenever the fast decoder answers, libpng answers the same.
    rng = np.random.default_rng(2)
    answered = 0
    for _ in range(300):
        height, width = rng.integers(1, 40, 2)
        rows = rng.integers(0, 256, (height, width + 1)).astype(np.uint8)
        rows[:, 0] = rng.integers(0, 5, height)
        if rng.random() < 0.3:
            rows[rng.integers(height), 0] = rng.integers(5, 256)
        data = _png(np.zeros((height, width), np.uint8), raw=rows.tobytes(), idat_parts=int(rng.integers(1, 4)))
        ours = decode(data)
        libpng = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if ours is not None:
            answered += 1
            assert libpng is not None and np.array_equal(ours, libpng)
        elif (rows[:, 0] <= 4).all():
            raise AssertionError(f"a valid {height}x{width} file was declined")
    assert answered > 50


FOUR_GB_CHUNK = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABAEAAAAADfkv////8LfklEQVR4nO04LjUuAO3NLjEuMS4xIJDYICFh0AyG7rb7XVVdVRkZGZPyPHFzF49ORK5CYII="
)
"""89 bytes found by fuzzing: a 16-bit PNG whose second chunk declares 4 GB, which OpenCV allocated."""


def test_a_chunk_declaring_more_than_the_file_holds_never_reaches_opencv(monkeypatch):
    assert not chunks_fit(FOUR_GB_CHUNK)
    assert chunks_fit(_png(np.zeros((4, 4), np.uint8))) and chunks_fit(_png(np.zeros((4, 4), np.uint8))[:-5])
    calls = []
    monkeypatch.setattr(readers.cv2, "imdecode", lambda *args: calls.append(args))
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        load_image(FOUR_GB_CHUNK)
    assert calls == []


def test_a_header_declaring_more_rows_than_the_stream_can_hold_allocates_nothing(monkeypatch):
    huge = _png(np.zeros((1, 1), np.uint8), raw=b"\x00\x00")
    huge = huge.replace(struct.pack(">II", 1, 1), struct.pack(">II", 100_000, 100_000), 1)
    ihdr = huge.index(b"IHDR")
    huge = huge[: ihdr + 17] + struct.pack(">I", zlib.crc32(huge[ihdr : ihdr + 17])) + huge[ihdr + 21 :]
    assert _image_data(huge)[:2] == (100_000, 100_000)  # a well-formed file, its header checked
    allocated = []
    monkeypatch.setattr(np, "empty", lambda *args, **kwargs: allocated.append(args))
    assert decode_grey8(huge) is None and allocated == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_decodes_with_its_own_helper_threads(pixels):
    data = _png(pixels)
    assert np.array_equal(decode_grey8(data, overlap=True), pixels)  # the parent's pool now has a thread
    child = os.fork()
    if child == 0:  # the child: the parent's pool came without its thread
        os._exit(0 if np.array_equal(decode_grey8(data, overlap=True), pixels) else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise AssertionError("the forked child hung decoding")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def _inside(backing: np.ndarray, length: int) -> np.ndarray:
    """The first ``length`` entries of ``backing``: were an index check missing, stray accesses would stay in it."""
    return backing[:length]


@pytest.mark.parametrize("kind", range(5))
def test_the_filter_loop_checks_its_indices_itself_whatever_it_is_passed(kind):
    height, width = 3, 6
    raw = np.zeros(2 * height * (width + 1), dtype=np.uint8)
    raw[:: width + 1] = kind
    pixels = np.zeros((2 * height, width), dtype=np.uint8)
    scanlines = height * (width + 1)
    assert _unfilter(_inside(raw, scanlines), _inside(pixels, height), 0, height)
    with pytest.raises(IndexError):  # the last row's last byte missing
        _unfilter(_inside(raw, scanlines - 1), _inside(pixels, height), 0, height)
    with pytest.raises(IndexError):  # more rows asked for than there are pixels for
        _unfilter(raw, _inside(pixels, height), 0, height + 1)
    with pytest.raises(IndexError):  # pixel rows wider than the scanlines
        _unfilter(_inside(raw, scanlines), np.zeros((height, width + 1), dtype=np.uint8), 0, height)


def test_an_index_out_of_range_in_the_loop_is_declined_and_the_file_read_by_libpng(decode, pixels, monkeypatch):
    data = _png(pixels)
    checked = png._unfilter
    monkeypatch.setattr(png, "_unfilter", lambda raw, out, first, stop: checked(raw[:-1], out, first, stop))
    assert decode(data) is None
    assert np.array_equal(load_image(data).pixels, pixels / np.float32(255))


def test_a_loop_compiled_without_bounds_checks_never_meets_a_file(pixels, monkeypatch, caplog):
    # What NUMBA_BOUNDSCHECK=0 compiles, and numba's cache then serves to later processes too.
    monkeypatch.setattr(png, "_unfilter", numba.njit(nogil=True, boundscheck=False)(png._unfilter.py_func))
    png._checks_bounds.cache_clear()
    try:
        assert decode_grey8(_png(pixels)) is None
        assert "without bounds checks" in caplog.text
        assert np.array_equal(load_image(_png(pixels)).pixels, pixels / np.float32(255))
    finally:
        monkeypatch.undo()
        png._checks_bounds.cache_clear()
    assert np.array_equal(decode_grey8(_png(pixels)), pixels)
