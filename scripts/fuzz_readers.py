"""Coverage-guided fuzzing of the image readers (PNG, JPEG, DICOM) with atheris.

The contract under test: ``read_image(data)`` returns a finite float32 array in [0, 1] of the declared
shape, or raises ``ImageReadError``. Any other exception is a crash; an input taking over a second is a
hang (libFuzzer's ``-timeout``), and the process may not pass 1 GB (``-rss_limit_mb``).

The corpus starts from real images in ``../shared/data`` (small files as they are, downsized copies of
the large ones, in other colour modes) and small generated DICOMs (8/16-bit, signed, MONOCHROME1/2, RGB,
YBR, palette, VOI LUT, RLE, JPEG, JPEG 2000, undecodable JPEG-LS, multi-frame, deflated, big endian).

    .venv/bin/python scripts/fuzz_readers.py --runs 100000 --corpus /tmp/fuzz-corpus

Arguments after ``--`` go to libFuzzer as they are (``-- crash-1234`` replays one artifact). libFuzzer
exits 0 when the runs or the seconds are spent without a crash; a crash leaves ``crash-*`` (or
``timeout-*``, ``oom-*``) in ``--artifacts`` and exits non-zero.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import atheris
import numpy as np

os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")  # OpenCV logs on stderr for every damaged PNG
# The PNG decoder's filter loop is compiled by numba, which cannot compile bytecode that atheris has rewritten:
# it is exercised uninstrumented (its coverage guides nothing, but every input still runs through it).
with atheris.instrument_imports(include=["medlens.data.readers", "PIL", "pydicom"], exclude=["medlens.data.png"]):
    import pydicom.pixels
    from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, TiffImagePlugin  # noqa: F401

    from medlens.data.readers import read_image
    from medlens.errors import ImageReadError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MAX_LEN = 64 * 1024
"""Largest input libFuzzer generates; real files up to this size seed the corpus as they are."""
MAX_PIXELS = 2_000_000
"""The pixel limit the fuzzed reads run under (twice an NIH film). Decoding time grows with the pixels a
file declares, and a 700-byte JPEG can declare 8 million: under the library default (50 million) such a
file takes seconds to decode by design. This limit keeps every legitimate decode well under the 1-second
hang timeout, so a timeout means a parser that does not end, not a large image."""


def check_one_input(data: bytes) -> None:
    """Read ``data``; anything but a well-formed array or ImageReadError propagates as a crash."""
    channels = 3 if len(data) % 2 else 1  # both paths, chosen by the input so a crash replays exactly
    try:
        pixels = read_image(data, channels=channels, max_pixels=MAX_PIXELS)
    except ImageReadError:
        return
    rows, columns = pixels.shape[:2]
    expected_ndim = 3 if channels == 3 else 2
    if pixels.dtype != np.float32 or pixels.ndim != expected_ndim or (channels == 3 and pixels.shape[2] != 3):
        raise AssertionError(f"channels={channels} gave {pixels.dtype} of shape {pixels.shape}")
    if rows * columns == 0 or rows * columns > MAX_PIXELS:
        raise AssertionError(f"shape {pixels.shape} is empty or over the pixel limit")
    if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise AssertionError(f"values outside [0, 1] or not finite: {pixels.min()}..{pixels.max()}")


# ---------------------------------------------------------------- seeds


def real_seeds(shared: Path, max_len: int) -> Iterator[tuple[str, bytes]]:
    """The smallest PNG and JPEG of each image folder, as they are if small, and downsized copies."""
    for folder in ("cxr4", "nih14", "faces-lfw15"):
        for suffixes in ((".png",), (".jpg", ".jpeg")):
            files = sorted(
                (p for p in (shared / folder).rglob("*") if p.suffix.lower() in suffixes),
                key=lambda p: (p.stat().st_size, p.name),
            )
            if not files:
                continue
            data = files[0].read_bytes()
            stem = f"{folder}-{files[0].stem}"
            if len(data) <= max_len:
                yield f"{stem}{files[0].suffix}", data
            yield from _downsized(stem, Image.open(io.BytesIO(data)))


def _downsized(stem: str, image: Image.Image) -> Iterator[tuple[str, bytes]]:
    """64-pixel copies in the modes the readers branch on: grey 8/16-bit, alpha, palette, CMYK, EXIF."""
    small = image.convert("RGB")
    small.thumbnail((64, 64))
    grey = small.convert("L")
    rgba = small.convert("RGBA")
    rgba.putalpha(grey)
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    variants: list[tuple[str, Image.Image, str, dict]] = [
        ("grey", grey, "PNG", {}),
        ("grey16", Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG", {}),
        ("grey-alpha", rgba.convert("LA"), "PNG", {}),
        ("rgba", rgba, "PNG", {}),
        ("palette-transparent", palette, "PNG", {"transparency": 0}),
        ("bilevel", grey.convert("1"), "PNG", {}),
        ("rgb-exif", small, "PNG", {"exif": exif}),
        ("grey", grey, "JPEG", {"quality": 80}),
        ("rgb-progressive-exif", small, "JPEG", {"progressive": True, "exif": exif}),
        ("cmyk", small.convert("CMYK"), "JPEG", {}),
    ]
    for name, variant, fmt, options in variants:
        buffer = io.BytesIO()
        variant.save(buffer, fmt, **options)
        yield f"{stem}-{name}.{fmt.lower()}", buffer.getvalue()


def dicom_seeds() -> Iterator[tuple[str, bytes]]:
    """Small DICOMs covering the photometric interpretations, LUTs and transfer syntaxes the reader handles."""
    from pydicom import uid
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence

    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    grey12 = rng.integers(0, 4096, (12, 10), dtype=np.uint16)
    rgb8 = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)

    def voi_lut(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [256, 0, 8]
        item.LUTData = list(range(0, 512, 2))
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = Sequence([item])

    def palette(ds: Dataset) -> None:
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", rng.integers(0, 65536, 256, dtype="<u2").tobytes())

    def fragments(name: str, pixels: np.ndarray) -> list[bytes]:
        """JPEG and JPEG 2000 made by PIL; other compressed syntaxes get bytes that no decoder accepts."""
        fmt = {"jpeg-baseline": "JPEG", "jpeg2000": "JPEG2000"}.get(name)
        if fmt is None:
            return [pixels.tobytes()[:64]]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        return [buffer.getvalue()]

    windowed = {"RescaleSlope": 2, "RescaleIntercept": -1024, "WindowCenter": 2000, "WindowWidth": 3000}
    cases: list[tuple[str, np.ndarray, str, str, Callable[[Dataset], None] | None, dict]] = [
        ("mono2-u16-window", grey12, "MONOCHROME2", uid.ExplicitVRLittleEndian, None, windowed),
        ("mono1-u8", grey8, "MONOCHROME1", uid.ExplicitVRLittleEndian, None, {}),
        ("mono2-s16-voilut", grey12.astype(np.int16) - 2048, "MONOCHROME2", uid.ExplicitVRLittleEndian, voi_lut, {}),
        ("rgb8", rgb8, "RGB", uid.ExplicitVRLittleEndian, None, {}),
        ("ybr-full", pydicom.pixels.convert_color_space(rgb8, "RGB", "YBR_FULL"), "YBR_FULL",
         uid.ExplicitVRLittleEndian, None, {}),
        ("palette", grey8, "PALETTE COLOR", uid.ExplicitVRLittleEndian, palette, {}),
        ("implicit-vr", grey12, "MONOCHROME2", uid.ImplicitVRLittleEndian, None, {}),
        ("big-endian", grey12, "MONOCHROME2", uid.ExplicitVRBigEndian, None, {}),
        ("deflated", grey12, "MONOCHROME2", uid.DeflatedExplicitVRLittleEndian, None, {}),
        ("rle", grey12, "MONOCHROME2", uid.RLELossless, None, {}),
        ("jpeg-baseline", rgb8, "YBR_FULL_422", uid.JPEGBaseline8Bit, None, {}),
        ("jpeg2000", grey8, "MONOCHROME2", uid.JPEG2000Lossless, None, {}),
        ("jpegls-no-decoder", grey8, "MONOCHROME2", uid.JPEGLSLossless, None, {}),
        ("multi-frame", np.stack([grey12, grey12]), "MONOCHROME2", uid.ExplicitVRLittleEndian, None, {}),
    ]  # fmt: skip
    for name, pixels, photometric, syntax, extra, elements in cases:
        native = uid.ExplicitVRLittleEndian if syntax == uid.RLELossless else syntax
        ds = _dicom_dataset(pixels, photometric, native, multi_frame=name == "multi-frame", **elements)
        if extra is not None:
            extra(ds)
        if syntax == uid.RLELossless:
            ds.compress(syntax)  # pydicom's own RLE encoder
        elif syntax.is_compressed:
            ds.PixelData = encapsulate(fragments(name, pixels))
            ds["PixelData"].VR = "OB"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        yield f"dicom-{name}.dcm", buffer.getvalue()


def _dicom_dataset(pixels: np.ndarray, photometric: str, syntax: str, multi_frame: bool, **elements: object):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    frame_shape = pixels.shape[1:] if multi_frame else pixels.shape
    ds.Rows, ds.Columns = frame_shape[:2]
    if multi_frame:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if len(frame_shape) == 3 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def write_seeds(corpus: Path, shared: Path, max_len: int) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = [*dicom_seeds(), *(real_seeds(shared, max_len) if shared.is_dir() else [])]
    if not shared.is_dir():
        print(f"{shared} is absent: seeding with generated DICOMs only", file=sys.stderr)
    for name, data in seeds:
        (corpus / f"seed-{name}").write_bytes(data)
    return len(seeds)


RSS_LIMIT_MB = 1024
FRESH_START = "MEDLENS_FUZZ_FRESH_START"


def restart_with_own_peak_rss() -> None:
    """Re-run this script through a shell when its peak RSS is inherited rather than its own.

    Linux hands a fork+exec'd child its parent's peak RSS as its own ``ru_maxrss``, which is what libFuzzer's
    ``-rss_limit_mb`` reads: started from a big process (a long pytest run), the fuzzer would report a false
    out-of-memory at once. A shell that forks the fuzzer from its own small process makes the count start afresh.
    """
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if os.environ.get(FRESH_START) or peak_mb < RSS_LIMIT_MB / 2 or not Path("/bin/sh").exists():
        return
    os.environ[FRESH_START] = "1"
    os.execv("/bin/sh", ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, *sys.argv])


def main() -> None:
    restart_with_own_peak_rss()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000, help="inputs to try (libFuzzer -runs)")
    parser.add_argument("--max-seconds", type=int, default=0, help="stop after this long (0: no limit)")
    parser.add_argument("--corpus", type=Path, help="corpus folder, kept and grown (default: a temporary one)")
    parser.add_argument("--artifacts", type=Path, help="where crash-*/timeout-*/oom-* inputs go (default: tmp)")
    parser.add_argument("--shared", type=Path, default=SHARED_DATA, help="real images to seed from")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: from the clock)")
    parser.add_argument("libfuzzer", nargs="*", help="after --: more libFuzzer flags, or artifacts to replay")
    args = parser.parse_args()

    # The readers' callers decide what to log; pydicom and PIL warn on every other mutated file.
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)

    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="medlens-fuzz-corpus-"))
    artifacts = args.artifacts or Path(tempfile.gettempdir()) / "medlens-fuzz-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    replaying = any(Path(arg).is_file() for arg in args.libfuzzer)
    if not replaying:
        print(f"{write_seeds(corpus, args.shared, MAX_LEN)} seeds in {corpus}", file=sys.stderr)
        # Lazy imports (decoders, PIL plugins) on a first read must not count against -timeout.
        for seed in sorted(corpus.iterdir())[:200]:
            check_one_input(seed.read_bytes())
    flags = [
        f"-runs={args.runs}",
        f"-max_total_time={args.max_seconds}",
        f"-max_len={MAX_LEN}",
        f"-seed={args.seed}",
        "-timeout=1",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
    ]
    atheris.Setup([sys.argv[0], *flags, *args.libfuzzer, *([] if replaying else [str(corpus)])], check_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
