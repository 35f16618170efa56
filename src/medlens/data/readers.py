"""Image readers: PNG, JPEG and DICOM into one array type.

Every reader returns ``float32`` pixels in ``[0, 1]``: shape ``(H, W)`` for ``channels=1`` (the X-ray
default) and ``(H, W, 3)`` for ``channels=3`` (faces, colour photos). 8-bit values are divided by 255,
16-bit by 65535; palette images are expanded, alpha is composited over black, colour is reduced to
luminance with the ITU-R 601 weights PIL uses. DICOM goes through the modality LUT (RescaleSlope /
Intercept), then the VOI LUT or window, whose output range becomes [0, 1] (without either, the image's
own range does), and MONOCHROME1 is inverted so bone is always bright. Colour DICOM (RGB, YBR, palette)
is divided by its bit depth.

Anything that cannot be read raises :class:`~medlens.errors.ImageReadError`, whose message names the file
and the problem. Nothing here logs pixel data or DICOM patient fields.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps

from medlens.errors import ImageReadError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pydicom.dataset import Dataset
    from pydicom.uid import UID

DEFAULT_MAX_PIXELS = 50_000_000
"""Images with more pixels than this are refused (decompression bombs); override per call."""
COLOUR_SAMPLE_SIDE = 128
"""The colour copy a grey read keeps (:attr:`LoadedImage.colour`) has about this many pixels squared."""
MAX_BYTES_PER_PIXEL = 8
MAX_DICOM_HEADER_BYTES = 16 * 2**20
"""With the pixel limit, how far a deflated DICOM may inflate (3 x 16-bit or 64-bit samples, plus elements)."""

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES

# Technical DICOM fields that identify no one; the only ones medlens ever copies out of a file.
DICOM_TECHNICAL_FIELDS = (
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsStored",
    "PixelSpacing",
)

Channels = Literal[1, 3]
ImageSource = str | Path | bytes


@dataclass
class LoadedImage:
    """Pixels plus what the server may show about them."""

    pixels: np.ndarray
    format: Literal["png", "jpeg", "dicom"]
    dicom: dict[str, object] = field(default_factory=dict)
    colour: np.ndarray | None = None
    """Where the file held colour and ``pixels`` were made grey: a small RGB copy (:func:`colour_sample`), so
    that the X-ray guard sees the colour without decoding the file again."""


def read_image(
    source: ImageSource, *, channels: Channels = 1, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> np.ndarray:
    """Read a PNG, JPEG or DICOM file (or its bytes) as float32 in [0, 1]."""
    return load_image(source, channels=channels, max_pixels=max_pixels, name=name).pixels


def load_image(
    source: ImageSource,
    *,
    channels: Channels = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    overlap: bool = False,
) -> LoadedImage:
    """Like :func:`read_image`, but also says the format and the non-identifying DICOM fields.

    ``overlap``: decode a greyscale PNG on two threads, for one image's latency (see :mod:`medlens.data.png`).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    label, data = _bytes_of(source, name)
    kind = sniff_format(data)
    if kind is None:
        head = data[:16]
        raise ImageReadError(label, f"not a PNG, JPEG or DICOM image (starts with {head!r})")
    technical: dict[str, object] = {}
    if kind == "dicom":
        pixels, technical = _decode_dicom(data, label, max_pixels)
    elif kind != "png" or (pixels := _decode_plain_grey_png(data, label, max_pixels, overlap)) is None:
        pixels = _decode_raster(data, label, max_pixels)
    colour = colour_sample(pixels) if pixels.ndim == 3 and channels == 1 else None
    return LoadedImage(_to_channels(pixels, channels), kind, technical, colour)


def colour_sample(rgb: np.ndarray, side: int = COLOUR_SAMPLE_SIDE) -> np.ndarray:
    """About ``side`` x ``side`` pixels of a float RGB image, every k-th row and column, for shares such as that
    of coloured pixels (which a sample of pixels estimates without bias). Microseconds, whatever the size."""
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1]) / side))
    return np.array(rgb[::step, ::step], dtype=np.float32)


def _bytes_of(source: ImageSource, name: str | None) -> tuple[str, bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        label = name or "<uploaded bytes>"
    else:
        path = Path(source)
        label = name or str(path)
        suffix = path.suffix.lower()
        # DICOM exports often have no extension, or are named by a UID ("1.2.840.1136"): sniff those by content.
        if suffix and suffix not in IMAGE_SUFFIXES and not suffix[1:].isdigit():
            raise ImageReadError(label, f"unknown extension {suffix!r}; expected one of {sorted(IMAGE_SUFFIXES)}")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageReadError(label, "no such file") from None
        except IsADirectoryError:
            raise ImageReadError(label, "is a directory, not an image file") from None
        except OSError as exc:
            raise ImageReadError(label, f"cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")
    return label, data


def sniff_format(data: bytes) -> Literal["png", "jpeg", "dicom"] | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def _decode_plain_grey_png(data: bytes, label: str, max_pixels: int, overlap: bool = False) -> np.ndarray | None:
    """An 8- or 16-bit greyscale PNG (how chest X-rays come), else None.

    PNG is lossless, so every decoder gives PIL's values: :mod:`medlens.data.png` for 8 bits (decode + resize
    1.6x faster than with OpenCV), OpenCV (1.2x faster than PIL) for the rest. Decoding is most of what building
    the cache and serving a request cost. Anything else (colour, palette, transparency, EXIF orientation,
    damage) returns None and goes through PIL, which explains failures.
    """
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if colour != 0 or depth not in (8, 16) or width == 0 or height == 0:
        return None
    _check_pixels(label, width, height, max_pixels)
    ancillary = data[: max(data.find(b"IDAT"), 0)]
    if b"tRNS" in ancillary or b"eXIf" in ancillary:
        return None
    from medlens.data.png import chunks_fit, decode_grey8  # numba and LLVM load on the first PNG, not on import

    pixels = decode_grey8(data, overlap=overlap) if depth == 8 else None
    if pixels is None:  # 16-bit, interlaced, or not strictly well-formed: libpng, which is more forgiving
        if not chunks_fit(data):
            return None  # PIL reads only what is there, and says the file is truncated
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.shape != (height, width):
        return None
    return np.divide(pixels, np.float32(255 if depth == 8 else 65535), dtype=np.float32)


def _decode_raster(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; PIL's bomb warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            _check_pixels(label, width, height, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        # PIL refuses far larger images on its own, before our check can run.
        raise ImageReadError(label, f"image is over the pixel limit ({exc})") from None
    except Exception as exc:  # PIL's parsers fail on damaged files with many types (IndexError, struct.error, ...)
        raise ImageReadError(label, f"corrupt or truncated image ({_reason(exc)})") from None
    return _pil_to_array(image, label)


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(label, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageReadError(
            label, f"image is {width}x{height} = {width * height:,} pixels, over the pixel limit of {max_pixels:,}"
        )


def _pil_to_array(image: Image.Image, label: str) -> np.ndarray:
    """Float pixels in [0, 1], grey or RGB as the file holds them (transparency composited over black)."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB" if mode != "1" else "L")
    elif mode == "PA":
        image = image.convert("RGBA")
    mode = image.mode
    arr = np.asarray(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        pixels = arr.astype(np.float32) / 65535.0
    elif mode == "I":
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
        pixels = np.clip(arr.astype(np.float32) / top, 0.0, 1.0)
    elif mode == "F":
        pixels = _min_max(arr.astype(np.float32))
    elif arr.dtype == np.uint8:
        pixels = arr.astype(np.float32) / 255.0
    else:
        raise ImageReadError(label, f"unsupported pixel mode {mode!r}")
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):
        # Composite over black: transparent areas carry no image.
        alpha = pixels[..., -1:]
        pixels = pixels[..., :-1] * alpha
        if pixels.shape[2] == 1:
            pixels = pixels[..., 0]
    return pixels


def _to_channels(pixels: np.ndarray, channels: Channels) -> np.ndarray:
    if channels == 1:
        if pixels.ndim == 3:
            pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.ascontiguousarray(pixels, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    return _unit_range(values, float(values.min()), float(values.max()))


def _decode_dicom(data: bytes, label: str, max_pixels: int) -> tuple[np.ndarray, dict[str, object]]:
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        raise ImageReadError(label, "reading DICOM needs pydicom: pip install pydicom") from None
    try:
        _check_inflated_size(data, label, max_pixels)
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = _dicom_pixels(ds, label, max_pixels)
        technical = {key: _plain(ds.get(key)) for key in DICOM_TECHNICAL_FIELDS if key in ds}
        syntax = ds.file_meta.get("TransferSyntaxUID")
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom converts elements lazily, so a damaged file can fail anywhere, as any type
        raise ImageReadError(label, f"corrupt DICOM file ({_reason(exc)})") from None
    if syntax is not None:
        technical["TransferSyntax"] = syntax.name
    return pixels, technical


def _check_inflated_size(data: bytes, label: str, max_pixels: int) -> None:
    """A deflated DICOM may not inflate past what its pixels could need: pydicom inflates it whole, in memory."""
    from pydicom.filereader import _read_file_meta_info, read_preamble  # the steps dcmread itself takes first
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)
    read_preamble(stream, False)
    if _read_file_meta_info(stream).get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    limit = MAX_BYTES_PER_PIXEL * max_pixels + MAX_DICOM_HEADER_BYTES
    if len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[stream.tell() :], limit + 1)) > limit:
        raise ImageReadError(
            label, f"deflated DICOM inflates to over {limit:,} bytes, more than {max_pixels:,} pixels can need"
        )


def _dicom_pixels(ds: Dataset, label: str, max_pixels: int) -> np.ndarray:
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data (not an image, or truncated)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageReadError(label, f"multi-frame DICOM ({frames} frames) is not supported; export a single frame")
    rows, columns, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1)
    _check_pixels(label, columns, rows, max_pixels)
    raw = _dicom_raw_pixels(ds, label)
    expected = (rows, columns) if samples == 1 else (rows, columns, 3)
    if raw.shape != expected:
        # pydicom infers extra frames from a long pixel data element; a damaged header looks the same.
        raise ImageReadError(
            label, f"DICOM pixel data has shape {raw.shape}, expected {expected} (extra frames or a damaged header)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if samples == 3:
            # pydicom has already converted YBR colour to RGB.
            return _unit_range(raw.astype(np.float32), 0.0, 2.0 ** int(ds.BitsStored) - 1)
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            rgb = apply_color_lut(raw, ds)
            if rgb.shape != (*raw.shape, 3):  # pydicom leaves out the colour of a missing table
                raise ValueError(f"the palette gives {rgb.shape[-1]} colour channels, not 3")
            return _unit_range(rgb.astype(np.float32), 0.0, float(np.iinfo(rgb.dtype).max))
        pixels = _grey_levels(ds, raw)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ImageReadError(label, f"DICOM lookup tables cannot be applied ({_reason(exc)})") from None
    return 1.0 - pixels if photometric == "MONOCHROME1" else pixels


def _dicom_raw_pixels(ds: Dataset, label: str) -> np.ndarray:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000TransferSyntaxes

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ImageReadError(label, f"pydicom has no decoder for {syntax.name} ({syntax})") from None
        if not decoder.is_available:
            options = "; ".join(decoder.missing_dependencies)
            raise ImageReadError(
                label, f"{syntax.name} pixel data needs a decoder that is not installed; install one of: {options}"
            )
        if syntax in JPEG2000TransferSyntaxes and _jp2_box_of_length_zero(ds):
            raise ImageReadError(label, f"{syntax.name} pixel data is damaged (a JP2 box of length 0)")
        _check_declared_size(ds, label, syntax)
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise a wide range of types for damaged pixel data
        if syntax is not None and syntax.is_compressed:
            raise ImageReadError(
                label,
                f"{syntax.name} pixel data cannot be decoded (damaged, or a variant the installed decoders "
                f"do not support): {_reason(exc)}",
            ) from None
        raise ImageReadError(label, f"DICOM pixel data cannot be decoded ({_reason(exc)})") from None


def _encoded_frames(ds: Dataset) -> Iterator[bytes]:
    """The compressed frames pydicom's decoder will read (multi-frame files are refused before this)."""
    from pydicom.encaps import generate_frames

    offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if "ExtendedOffsetTable" in ds else None
    return generate_frames(ds.PixelData, number_of_frames=1, extended_offsets=offsets)


def _check_declared_size(ds: Dataset, label: str, syntax: UID) -> None:
    """A JPEG or JPEG 2000 stream must be as large as the DICOM header says: its decoder allocates its own size."""
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGTransferSyntaxes

    if syntax not in JPEGTransferSyntaxes and syntax not in JPEG2000TransferSyntaxes:
        return
    for frame in _encoded_frames(ds):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                width, height = Image.open(io.BytesIO(frame)).size  # reads the stream's header only
        except Image.DecompressionBombError:
            width, height = 2**16, 2**16  # far too large, in any case
        except Exception:  # a stream PIL cannot parse: its decoder will fail on it, and that is caught
            continue
        if (width, height) != (ds.Columns, ds.Rows):
            raise ImageReadError(
                label,
                f"the {syntax.name} stream is {width}x{height} pixels, the DICOM header says "
                f"{ds.Columns}x{ds.Rows} (damaged, or a decompression bomb)",
            )


def _jp2_box_of_length_zero(ds: Dataset) -> bool:
    """Whether a JP2 box before the codestream says length 0: pydicom 3.0 walks the boxes by length, forever."""
    for frame in _encoded_frames(ds):
        if not frame.startswith(b"\x00\x00\x00\x0cjP  "):
            continue
        offset = 12
        while offset < len(frame) and frame[offset + 4 : offset + 8] != b"jp2c":
            length = int.from_bytes(frame[offset : offset + 4], "big")
            if length == 0:
                return True
            offset += length
    return False


def _grey_levels(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    """Stored values through the modality LUT, then the VOI LUT or window (a LUT wins, as in pydicom).

    A VOI LUT or window maps onto its own output range, which becomes [0, 1], so a window wider than
    the data is not stretched. Without either, the image's own range becomes [0, 1].
    """
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(raw, ds)
    lut = ds.VOILUTSequence[0] if ds.get("VOILUTSequence") else None
    if lut is not None and lut.get("LUTDescriptor") is not None and lut.get("LUTData") is not None:
        entries, first_mapped, _ = lut.LUTDescriptor
        # The declared bits per entry often overstate the entries, so the table's own range is the output range.
        table = apply_voi(np.arange(first_mapped, first_mapped + (entries or 2**16)), ds)
        shown = apply_voi(np.rint(values).astype(np.int64), ds)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # Values far below and above the window land on the ends of its output range.
        table = apply_windowing(np.array([-np.inf, np.inf]), ds)
        shown = apply_windowing(values, ds)
    else:
        return _min_max(np.asarray(values, dtype=np.float32))
    return _unit_range(np.asarray(shown, dtype=np.float32), float(table.min()), float(table.max()))


def _unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _reason(exc: Exception) -> str:
    """An exception as a short phrase; pydicom messages can quote whole element values."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def _plain(value: object) -> object:
    """DICOM values as JSON-friendly Python values."""
    if isinstance(value, str | int | float) or value is None:
        return value
    try:
        return [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return str(value)
