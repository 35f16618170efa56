"""A tiny trained checkpoint, clients of the app over it, and a real uvicorn server on loopback."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import CHROMIUM_FLAGS, tiny_run
from PIL import Image

from medlens.config import load_config
from medlens.jobs.train import train
from medlens.serve.app import create_app
from medlens.serve.background import serve_in_thread

TOKEN = "s3cret-token"
CHROMIUM = Path("/usr/bin/chromium")
TINY = tiny_run("data.image_size=64", "data.phantoms.size=128", "train.epochs=1")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch multi-label run on phantoms: its best/ checkpoint and its phantom images."""
    run = tmp_path_factory.mktemp("serve") / "run"
    train(load_config(None, TINY), run, progress=False)
    return run


@pytest.fixture(scope="session")
def xray_png(run_dir: Path) -> bytes:
    """A phantom chest X-ray the checkpoint was trained on (grey PNG that passes the X-ray guard)."""
    return sorted((run_dir / "phantoms").rglob("*.png"))[0].read_bytes()


@pytest.fixture(scope="session")
def client(run_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(run_dir)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def token() -> str:
    return TOKEN


@pytest.fixture(scope="session")
def secured_client(run_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(run_dir, token=TOKEN)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def live_server(run_dir: Path) -> Iterator[str]:
    """The app under a real uvicorn on 127.0.0.1 (a free port), in a thread; yields its base URL.

    ``log_config=None`` leaves uvicorn's loggers propagating to the root logger, so caplog sees them.
    """
    with serve_in_thread(create_app(run_dir), start_seconds=30, log_config=None, log_level="debug") as base_url:
        yield base_url
    logging.getLogger("uvicorn.error").setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def encode() -> Callable[..., bytes]:
    """``encode(pixels, "PNG" | "JPEG")``: uint8 pixels as image bytes."""
    return _encode


@pytest.fixture(scope="session")
def make_dicom() -> Callable[..., bytes]:
    """``make_dicom(pixels, frames=1, patient_name=..., patient_id=...)``: DICOM bytes."""
    return _make_dicom


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _make_dicom(
    pixels: np.ndarray,
    frames: int = 1,
    patient_name: str = "CANARY^SECRET",
    patient_id: str = "CANARY-ID-4711",
) -> bytes:
    """A small uncompressed MONOCHROME2 DICOM (uint16) with patient fields that must never leak."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19010203"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    stack = np.stack([pixels] * frames).astype(np.uint16) * 16
    ds.Rows, ds.Columns = pixels.shape
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (stack if frames > 1 else stack[0]).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def browser():
    """The system Chromium driven by Playwright (no browser download); skips where either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium (scripts/setup-system.sh)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_FLAGS))
        yield chromium
        chromium.close()
