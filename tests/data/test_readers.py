"""The image readers: PNG, JPEG and DICOM in, float32 in [0, 1] out, ImageReadError for anything else."""

from __future__ import annotations

import io
import random
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medlens.data import readers
from medlens.data.readers import DICOM_TECHNICAL_FIELDS, load_image, read_image
from medlens.errors import ImageReadError

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-0042-XYZ", "PatientBirthDate": "19610704"}


# ---------------------------------------------------------------- file makers


def _png(path: Path, array: np.ndarray, mode: str | None = None, **save) -> Path:
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, "PNG", **save)
    return path


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(path: Path, array: np.ndarray, **save) -> Path:
    Image.fromarray(array).save(path, "JPEG", quality=95, **save)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid-looking PNG of a few dozen bytes that claims width x height pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def _dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    syntax: str = ExplicitVRLittleEndian,
    fragments: list[bytes] | None = None,
    bits_stored: int | None = None,
    **elements: object,
) -> Path:
    """A small DICOM file; `fragments`, if given, replace the pixels' bytes as encapsulated (compressed) data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.PixelSpacing = [0.143, 0.143]
    if pixels is not None:
        colour = photometric.startswith(("RGB", "YBR"))
        if pixels.ndim == (4 if colour else 3):
            ds.NumberOfFrames = pixels.shape[0]
        ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        ds.PixelData = encapsulate(fragments) if fragments is not None else pixels.tobytes()
        if fragments is not None:
            ds["PixelData"].VR = "OB"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- PNG


def test_png_8bit_grayscale_divides_by_255(tmp_path):
    values = np.array([[0, 51], [204, 255]], dtype=np.uint8)
    loaded = load_image(_png(tmp_path / "gray.png", values))
    assert loaded.format == "png" and loaded.dicom == {}
    assert loaded.pixels.dtype == np.float32 and loaded.pixels.shape == (2, 2)
    np.testing.assert_allclose(loaded.pixels, values / 255.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grey_png_decoded_on_the_fast_path_has_exactly_pils_pixels(dtype):
    """8/16-bit greyscale PNGs (chest X-rays) take medlens's or OpenCV's faster decoder; PNG is lossless, so
    nothing changes."""
    top = np.iinfo(dtype).max
    values = np.random.default_rng(3).integers(0, top, (37, 53), dtype=dtype, endpoint=True)
    data = _png_bytes(values)
    assert readers._decode_plain_grey_png(data, "grey.png", 10**6) is not None
    np.testing.assert_array_equal(read_image(data), np.asarray(Image.open(io.BytesIO(data)), np.float32) / top)


def test_png_16bit_divides_by_65535(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    pixels = read_image(_png(tmp_path / "deep.png", values))
    assert pixels.dtype == np.float32
    assert pixels[0, 0] == 0.0 and pixels[0, 2] == 1.0
    assert pixels[0, 1] == pytest.approx(0.5, abs=1e-4)


def test_png_rgb_keeps_colour_and_reduces_to_luminance(tmp_path):
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    path = _png(tmp_path / "red.png", red)
    colour = read_image(path, channels=3)
    assert colour.shape == (4, 4, 3)
    np.testing.assert_allclose(colour[0, 0], [1.0, 0.0, 0.0])
    gray = read_image(path)
    assert gray.shape == (4, 4)
    np.testing.assert_allclose(gray, LUMA[0], atol=1e-6)


def test_channels_3_from_grayscale_repeats_the_plane(tmp_path):
    values = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    pixels = read_image(_png(tmp_path / "gray.png", values), channels=3)
    assert pixels.shape == (4, 4, 3)
    for plane in range(3):
        np.testing.assert_allclose(pixels[..., plane], values / 255.0, atol=1e-6)


def test_png_rgba_is_composited_over_black(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 0)  # transparent white: nothing there
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[1, 0] = (255, 255, 255, 51)  # 20 % white
    pixels = read_image(_png(tmp_path / "rgba.png", rgba, "RGBA"), channels=3)
    assert pixels.shape == (2, 2, 3)
    np.testing.assert_allclose(pixels[0, 0], 0.0)
    np.testing.assert_allclose(pixels[0, 1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(pixels[1, 0], 0.2, atol=1e-6)


def test_png_gray_with_alpha_is_composited_over_black(tmp_path):
    la = np.zeros((1, 2, 2), dtype=np.uint8)
    la[0, 0] = (200, 255)
    la[0, 1] = (200, 0)
    pixels = read_image(_png(tmp_path / "la.png", la, "LA"))
    assert pixels.shape == (1, 2)
    np.testing.assert_allclose(pixels[0], [200 / 255, 0.0], atol=1e-6)


@pytest.mark.parametrize("transparent", [False, True], ids=["opaque", "transparency"])
def test_png_palette_is_expanded(tmp_path, transparent):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    image.putdata([0, 1])
    path = tmp_path / "palette.png"
    image.save(path, **({"transparency": 0} if transparent else {}))
    pixels = read_image(path, channels=3)
    assert pixels.shape == (1, 2, 3)
    np.testing.assert_allclose(pixels[0, 0], [0.0, 0.0, 0.0] if transparent else [0.0, 1.0, 0.0])
    np.testing.assert_allclose(pixels[0, 1], [1.0, 0.0, 0.0])


# ---------------------------------------------------------------- JPEG


def test_jpeg_grayscale(tmp_path):
    loaded = load_image(_jpeg(tmp_path / "gray.jpg", np.full((16, 16), 128, dtype=np.uint8)))
    assert loaded.format == "jpeg" and loaded.pixels.shape == (16, 16)
    np.testing.assert_allclose(loaded.pixels, 128 / 255, atol=2 / 255)


def test_jpeg_rgb_in_colour_and_as_luminance(tmp_path):
    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[...] = (200, 40, 10)
    path = _jpeg(tmp_path / "colour.jpeg", colour)
    rgb = read_image(path, channels=3)
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_allclose(rgb, np.broadcast_to(colour / 255.0, rgb.shape), atol=4 / 255)
    np.testing.assert_allclose(read_image(path), (colour[0, 0] / 255.0) @ LUMA, atol=4 / 255)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((16, 32), dtype=np.uint8)  # 32 wide, 16 high; right half white
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    pixels = read_image(_jpeg(tmp_path / "phone.jpg", stored, exif=exif))
    assert pixels.shape == (32, 16)
    assert pixels[:16].mean() < 0.1 and pixels[16:].mean() > 0.9  # turned clockwise, the right half is below


# ---------------------------------------------------------------- bytes, labels, file naming


def test_bytes_input_reads_like_a_file():
    values = np.array([[0, 255]], dtype=np.uint8)
    np.testing.assert_allclose(read_image(_png_bytes(values)), [[0.0, 1.0]])
    np.testing.assert_allclose(read_image(bytearray(_png_bytes(values))), [[0.0, 1.0]])


def test_bytes_errors_carry_the_default_or_given_label():
    with pytest.raises(ImageReadError, match=r"^<uploaded bytes>: ") as caught:
        read_image(b"hello")
    assert caught.value.source == "<uploaded bytes>"
    with pytest.raises(ImageReadError, match=r"^scan-17\.png: not a PNG, JPEG or DICOM"):
        read_image(b"hello", name="scan-17.png")


def test_content_decides_the_format_not_the_extension(tmp_path):
    jpeg = _jpeg(tmp_path / "really-a-jpeg.png", np.full((8, 8), 255, dtype=np.uint8))
    assert load_image(jpeg).format == "jpeg"


@pytest.mark.parametrize("filename", ["IM0001", "1.2.826.0.1.3680043.8.498.1234"], ids=["no-suffix", "uid-name"])
def test_dicom_exports_named_without_an_extension_are_sniffed(tmp_path, filename):
    path = _dicom(tmp_path / filename, np.array([[0, 4095]], dtype=np.uint16), bits_stored=12)
    assert load_image(path).format == "dicom"


def test_invalid_channels_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        read_image(_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8)), channels=2)


# ---------------------------------------------------------------- DICOM


def test_dicom_monochrome2_16bit_with_rescale(tmp_path):
    raw = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    path = _dicom(tmp_path / "ct.dcm", raw, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    loaded = load_image(path)
    assert loaded.format == "dicom" and loaded.pixels.dtype == np.float32 and loaded.pixels.shape == (2, 2)
    np.testing.assert_allclose(loaded.pixels, raw / 4000.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    path = _dicom(tmp_path / "cr.dcm", raw, photometric="MONOCHROME1", bits_stored=12, RescaleSlope=1)
    np.testing.assert_allclose(read_image(path), 1.0 - raw / 4000.0, atol=1e-6)


def test_dicom_window_applies_in_rescaled_units(tmp_path):
    # Raw 0..400 become -100..700 HU; the window [100, 500] saturates both ends and maps 300 to the middle.
    raw = np.array([[0, 100, 200, 300, 400]], dtype=np.uint16)
    path = _dicom(
        tmp_path / "window.dcm", raw, bits_stored=12,
        RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=400,
    )  # fmt: skip
    np.testing.assert_allclose(read_image(path)[0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=0.01)


def test_dicom_window_wider_than_the_data_is_not_stretched(tmp_path):
    raw = np.array([[950, 1000, 1050]], dtype=np.uint16)
    path = _dicom(tmp_path / "wide.dcm", raw, bits_stored=12, WindowCenter=1000, WindowWidth=1000)
    np.testing.assert_allclose(read_image(path)[0], [0.45, 0.5, 0.55], atol=0.01)


def test_dicom_monochrome1_window_is_inverted(tmp_path):
    raw = np.array([[0, 1000, 4000]], dtype=np.uint16)
    path = _dicom(
        tmp_path / "m1w.dcm", raw, photometric="MONOCHROME1", bits_stored=12, WindowCenter=1000, WindowWidth=1000
    )
    np.testing.assert_allclose(read_image(path)[0], [1.0, 0.5, 0.0], atol=0.01)


def test_dicom_voi_lut_sequence_replaces_the_window(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4, 100, 16]  # 4 entries, first one maps value 100, 16-bit entries
    lut.LUTData = [1000, 2000, 3000, 5000]
    lut["LUTData"].VR = "US"
    raw = np.array([[0, 100, 101, 102]], dtype=np.uint16)  # the last entry, 5000, is not in the image
    path = _dicom(
        tmp_path / "lut.dcm", raw, bits_stored=12,
        VOILUTSequence=Sequence([lut]), WindowCenter=2000, WindowWidth=10,
    )  # fmt: skip
    np.testing.assert_allclose(read_image(path)[0], [0.0, 0.0, 0.25, 0.5], atol=1e-6)


def test_dicom_rgb_divides_by_the_bit_depth(tmp_path):
    rgb = np.full((2, 2, 3), (51, 102, 153), dtype=np.uint8)
    rgb[0, 0] = (200, 100, 50)
    path = _dicom(tmp_path / "photo.dcm", rgb, photometric="RGB")
    pixels = read_image(path, channels=3)
    assert pixels.shape == (2, 2, 3)
    np.testing.assert_allclose(pixels, rgb / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_image(path), (rgb / 255.0) @ LUMA, atol=1e-6)


def test_dicom_ybr_is_converted_to_rgb_once(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (40, 160, 220)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    pixels = read_image(_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"), channels=3)
    np.testing.assert_allclose(pixels, rgb / 255.0, atol=3 / 255)


def test_dicom_jpeg_baseline_is_decoded_in_colour(tmp_path):
    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[...] = (200, 40, 10)
    buffer = io.BytesIO()
    Image.fromarray(colour).save(buffer, "JPEG", quality=95)
    path = _dicom(
        tmp_path / "jpeg.dcm",
        colour,
        photometric="YBR_FULL_422",
        syntax=JPEGBaseline8Bit,
        fragments=[buffer.getvalue()],
    )
    pixels = read_image(path, channels=3)
    np.testing.assert_allclose(pixels, np.broadcast_to(colour / 255.0, pixels.shape), atol=4 / 255)


def test_dicom_rle_lossless_is_decoded(tmp_path):
    raw = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    ds = dcmread(_dicom(tmp_path / "plain.dcm", raw, bits_stored=12))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    loaded = load_image(tmp_path / "rle.dcm")
    assert loaded.dicom["TransferSyntax"] == RLELossless.name
    np.testing.assert_allclose(loaded.pixels, raw / 4000.0, atol=1e-6)


def test_dicom_palette_colour_is_expanded(tmp_path):
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = {"Red": [65535, 0, 0], "Green": [0, 65535, 0], "Blue": [0, 0, 32768]}
    tables = {}
    for colour, entries in palette.items():
        tables[f"{colour}PaletteColorLookupTableDescriptor"] = [3, 0, 16]
        tables[f"{colour}PaletteColorLookupTableData"] = np.array(entries, dtype="<u2").tobytes()
    pixels = read_image(_dicom(tmp_path / "palette.dcm", index, photometric="PALETTE COLOR", **tables), channels=3)
    np.testing.assert_allclose(pixels[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(pixels[0, 1], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(pixels[1, 0], [0.0, 0.0, 0.5], atol=1e-4)


def test_dicom_technical_fields_never_identify_the_patient(tmp_path):
    raw = np.array([[0, 4095]], dtype=np.uint16)
    path = _dicom(tmp_path / "who.dcm", raw, bits_stored=12, **PATIENT, InstitutionName="General Hospital")
    technical = load_image(path).dicom
    assert set(technical) <= {*DICOM_TECHNICAL_FIELDS, "TransferSyntax"}
    assert technical["Modality"] == "DX" and technical["ViewPosition"] == "PA"
    assert technical["Rows"] == 1 and technical["Columns"] == 2 and technical["BitsStored"] == 12
    assert technical["PixelSpacing"] == pytest.approx([0.143, 0.143])
    text = repr(technical)
    for keyword, value in PATIENT.items():
        assert keyword not in technical
        assert value not in text
    assert "Doe" not in text and "General Hospital" not in text


@pytest.mark.parametrize(
    ("syntax", "phrase"),
    [
        (JPEGLSLossless, r"JPEG-LS Lossless.*not installed.*pylibjpeg-libjpeg"),  # no JPEG-LS decoder is installed
        (JPEG2000Lossless, r"JPEG 2000.*cannot be decoded"),  # Pillow decodes JPEG 2000, but not these bytes
    ],
    ids=["no-decoder", "corrupt-stream"],
)
def test_dicom_compressed_pixels_that_cannot_be_decoded(tmp_path, syntax, phrase):
    raw = np.zeros((8, 8), dtype=np.uint16)
    bogus = [b"\x00not a codestream" * 4]
    path = _dicom(tmp_path / "packed.dcm", raw, bits_stored=12, syntax=syntax, fragments=bogus, **PATIENT)
    with pytest.raises(ImageReadError, match=phrase) as caught:
        read_image(path)
    assert "packed.dcm" in str(caught.value)
    assert not any(value in str(caught.value) for value in PATIENT.values())


def test_dicom_jpeg2000_box_of_length_zero_is_refused_not_looped_on(tmp_path):
    # Found by scripts/fuzz_readers.py: pydicom 3.0 walks the JP2 boxes by their lengths, and a 0 never ends.
    signature_box = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    fragment = signature_box + b"\x00\x00\x00\x00jp2h" + b"\x00" * 8
    raw = np.zeros((8, 8), dtype=np.uint16)
    path = _dicom(tmp_path / "loop.dcm", raw, syntax=JPEG2000Lossless, fragments=[fragment])

    def hung(signum, frame):
        raise TimeoutError("read_image hung on a JP2 box of length 0")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        with pytest.raises(ImageReadError, match="a JP2 box of length 0"):
            read_image(path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- bad input


def _valid_png(tmp_path: Path) -> Path:
    return _png(tmp_path / "valid.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))


def _bad_empty(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path, "empty file"


def _bad_truncated(tmp_path):
    data = _valid_png(tmp_path).read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path, "corrupt or truncated"


def _bad_text_as_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("findings: none\n")
    return path, "not a PNG, JPEG or DICOM image"


def _bad_bomb_header(tmp_path):
    return _png_header_only(tmp_path / "bomb.png", 20_000, 20_000), "pixel limit"


def _bad_large_header(tmp_path):
    return _png_header_only(tmp_path / "large.png", 10_000, 10_000), "pixel limit"


def _bad_gif(tmp_path):
    path = tmp_path / "anim.gif"
    Image.new("L", (2, 2)).save(path)
    return path, "unknown extension '.gif'"


def _bad_txt(tmp_path):
    path = tmp_path / "report.txt"
    path.write_text("no image")
    return path, "unknown extension '.txt'"


def _bad_directory(tmp_path):
    path = tmp_path / "series"
    path.mkdir()
    return path, "is a directory"


def _bad_directory_with_image_suffix(tmp_path):
    path = tmp_path / "series.dcm"
    path.mkdir()
    return path, "is a directory"


def _bad_missing(tmp_path):
    return tmp_path / "missing.png", "no such file"


def _bad_random_dcm(tmp_path):
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes())
    return path, "not a PNG, JPEG or DICOM image"


def _bad_dicom_broken_element(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x03\x00abc")  # a 4-byte UL holding 3 bytes
    return path, "corrupt DICOM"


def _bad_dicom_truncated(tmp_path):
    data = _dicom(tmp_path / "whole.dcm", np.zeros((8, 8), dtype=np.uint16), bits_stored=12).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path, "no pixel data (not an image, or truncated)"


def _bad_dicom_without_pixels(tmp_path):
    return _dicom(tmp_path / "sr.dcm", None), "no pixel data"


def _bad_multi_frame(tmp_path):
    return _dicom(tmp_path / "cine.dcm", np.zeros((3, 4, 4), dtype=np.uint16), bits_stored=12), "multi-frame"


def _bad_dicom_frames_without_a_count(tmp_path):
    # Pixel data for 4 rows under a header saying 2: pydicom would read two frames.
    path = _dicom(tmp_path / "long.dcm", np.zeros((4, 4), dtype=np.uint16), bits_stored=12, Rows=2)
    return path, "extra frames or a damaged header"


def _bad_dicom_short_pixel_data(tmp_path):
    path = _dicom(tmp_path / "short.dcm", np.zeros((4, 4), dtype=np.uint16), bits_stored=12, Rows=40)
    return path, "cannot be decoded"


def _bad_dicom_palette_without_a_table(tmp_path):
    # Found by scripts/fuzz_readers.py: pydicom expands a palette missing one table into 2 colour channels.
    tables = {}
    for colour in ("Red", "Green", "Blue"):
        tables[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        tables[f"{colour}PaletteColorLookupTableData"] = np.arange(256, dtype="<u2").tobytes()
    tables["BluePaletteColorLookupTableData"] = None
    index = np.zeros((4, 4), dtype=np.uint8)
    path = _dicom(tmp_path / "two-colours.dcm", index, photometric="PALETTE COLOR", **tables)
    return path, "the palette gives 2 colour channels, not 3"


def _bad_dicom_jpeg_larger_than_its_header(tmp_path):
    # Found by scripts/fuzz_readers.py (1.4 GB of memory): the decoder allocates what the JPEG stream declares.
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "JPEG")
    stream = bytearray(buffer.getvalue())
    frame = stream.index(b"\xff\xc0") + 5  # SOF0: marker, length, precision, then height and width
    stream[frame : frame + 4] = struct.pack(">HH", 12_000, 12_000)
    raw = np.zeros((8, 8), dtype=np.uint8)
    path = _dicom(tmp_path / "bomb.dcm", raw, syntax=JPEGBaseline8Bit, fragments=[bytes(stream)])
    return path, "stream is 12000x12000 pixels, the DICOM header says 8x8"


BAD_INPUTS = [
    _bad_empty,
    _bad_truncated,
    _bad_text_as_png,
    _bad_bomb_header,
    _bad_large_header,
    _bad_gif,
    _bad_txt,
    _bad_directory,
    _bad_directory_with_image_suffix,
    _bad_missing,
    _bad_random_dcm,
    _bad_dicom_broken_element,
    _bad_dicom_truncated,
    _bad_dicom_without_pixels,
    _bad_multi_frame,
    _bad_dicom_frames_without_a_count,
    _bad_dicom_short_pixel_data,
    _bad_dicom_palette_without_a_table,
    _bad_dicom_jpeg_larger_than_its_header,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda make: make.__name__.removeprefix("_bad_"))
@pytest.mark.filterwarnings("ignore:The number of bytes of pixel data is sufficient")
def test_bad_input_raises_image_read_error_naming_file_and_problem(tmp_path, make):
    path, phrase = make(tmp_path)
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    message = str(caught.value)
    assert path.name in message and caught.value.source == str(path)
    assert phrase in message


def test_pixel_limit_applies_to_real_images_and_dicom(tmp_path):
    with pytest.raises(ImageReadError, match=r"64x64 = 4,096 pixels, over the pixel limit of 1,000"):
        read_image(_valid_png(tmp_path), max_pixels=1000)
    dicom = _dicom(tmp_path / "big.dcm", np.zeros((64, 64), dtype=np.uint16), bits_stored=12)
    with pytest.raises(ImageReadError, match=r"big\.dcm: .*over the pixel limit"):
        read_image(dicom, max_pixels=1000)
    assert read_image(dicom, max_pixels=4096).shape == (64, 64)


def test_a_deflated_dicom_may_not_inflate_past_what_its_pixels_need(tmp_path):
    # pydicom inflates a deflated file whole, in memory: 300 KB of zeros inflate to 300 MB.
    raw = np.zeros((8, 8), dtype=np.uint16)
    zeros = bytes(24 * 2**20)
    path = _dicom(tmp_path / "zip.dcm", raw, syntax=DeflatedExplicitVRLittleEndian, EncapsulatedDocument=zeros)
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageReadError, match=r"deflated DICOM inflates to over 16,777,728 bytes, more than 64 pixels"):
        read_image(path, max_pixels=64)
    assert read_image(path).shape == (8, 8)  # within the default pixel limit's allowance


def _mutants(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        mutant = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(mutant))
            action = rng.random()
            if action < 0.6:
                mutant[position] = rng.randrange(256)
            elif action < 0.8:
                del mutant[position : position + rng.randint(1, 64)]
            else:
                mutant[position:position] = rng.randbytes(rng.randint(1, 16))
        yield bytes(mutant)


@pytest.mark.filterwarnings("ignore")
def test_mutated_files_only_ever_raise_image_read_error(tmp_path):
    gray = np.random.default_rng(2).integers(0, 4096, (12, 10), dtype=np.uint16)
    seeds = [
        _valid_png(tmp_path).read_bytes(),
        _png_bytes(np.dstack([gray.astype(np.uint8)] * 3)),
        _jpeg(tmp_path / "seed.jpg", np.dstack([gray.astype(np.uint8)] * 3)).read_bytes(),
        _dicom(tmp_path / "seed.dcm", gray, bits_stored=12, WindowCenter=2000, WindowWidth=800).read_bytes(),
    ]
    for seed_index, data in enumerate(seeds):
        for mutant in _mutants(data, 100, seed_index):
            try:
                pixels = read_image(mutant, channels=3)
            except ImageReadError:
                continue
            assert pixels.dtype == np.float32 and pixels.ndim == 3
            assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0


# ---------------------------------------------------------------- real data


@pytest.mark.shared
def test_every_shared_chest_xray_reads(shared_data):
    folders = [*sorted(p for p in (shared_data / "cxr4").iterdir() if p.is_dir()), shared_data / "nih14" / "images"]
    paths = [path for folder in folders for path in sorted(folder.iterdir()) if path.is_file()]
    assert len(paths) >= 300
    for path in paths:
        pixels = read_image(path)
        assert pixels.dtype == np.float32 and pixels.ndim == 2, path
        assert min(pixels.shape) >= 64, path
        assert 0.0 <= pixels.min() < pixels.max() <= 1.0, path
