"""Find the face in a photo, place its 68 landmarks, and cut out the aligned face chip.

One face per photo: when a photo holds several, the largest box is used and the count is reported
(``n_faces``); when it holds none, :class:`NoFaceError` says so, naming the photo.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medlens.config import FacesConfig
from medlens.data.readers import ImageSource, read_image
from medlens.errors import MedlensError
from medlens.faces.dlib_models import cnn_detector, hog_detector, import_dlib, landmark_predictor

log = logging.getLogger(__name__)

N_LANDMARKS = 68
Box = tuple[int, int, int, int]
"""left, top, right, bottom in image pixels (dlib's inclusive corners)."""


DEFAULT_SETTINGS = FacesConfig()


class NoFaceError(MedlensError, ValueError):
    """No human face was found in a photo."""

    def __init__(self, source: str, settings: FacesConfig):
        self.source = source
        self.settings = settings
        smallest = 80 >> settings.upsample  # both detectors scan an 80-pixel window
        super().__init__(
            f"{source}: no face found ({settings.detector} detector, upsample {settings.upsample}); use a photo "
            f"of a frontal face at least {smallest} pixels wide, or raise upsample (max 3) for smaller faces"
        )


@dataclass
class DetectedFace:
    """The face used from one photo: where it is, its landmarks, and the aligned chip."""

    box: Box
    landmarks: np.ndarray
    """68 x 2 float32 (x, y) in image pixels, iBUG order (jaw 0-16, brows, nose, eyes 36-47, mouth)."""
    chip: np.ndarray
    """The aligned face, uint8 ``chip_size x chip_size x 3`` RGB."""
    chip_landmarks: np.ndarray
    """The same 68 points in chip pixels."""
    n_faces: int
    seconds: dict[str, float]
    """Wall time of each step: ``detect`` (boxes) and ``align`` (landmarks and chip)."""


def as_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """An image as the contiguous uint8 H x W x 3 RGB dlib reads; floats are taken to be in [0, 1]."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(pixels)


def load_rgb(source: ImageSource | np.ndarray, name: str | None = None) -> tuple[np.ndarray, str]:
    """A file, its bytes or an array as uint8 RGB, plus the label errors should name."""
    if isinstance(source, np.ndarray):
        return as_uint8_rgb(source), name or "<image array>"
    label = name or ("<uploaded bytes>" if isinstance(source, bytes) else str(source))
    return as_uint8_rgb(read_image(source, channels=3, name=name)), label


def find_faces(image: np.ndarray, settings: FacesConfig = DEFAULT_SETTINGS) -> list[Box]:
    """Every face box the detector finds in a uint8 RGB image, in the detector's order."""
    if settings.detector == "cnn":
        rects = [found.rect for found in cnn_detector()(image, settings.upsample)]
    else:
        rects = list(hog_detector()(image, settings.upsample))
    return [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]


def detect_face(
    source: ImageSource | np.ndarray, settings: FacesConfig = DEFAULT_SETTINGS, *, name: str | None = None
) -> DetectedFace:
    """The largest face of a photo (path, bytes, or RGB array) with its landmarks and aligned chip."""
    image, label = load_rgb(source, name)
    started = time.perf_counter()
    boxes = find_faces(image, settings)
    detected = time.perf_counter()
    if not boxes:
        raise NoFaceError(label, settings)
    if len(boxes) > 1:
        log.debug("%s: %d faces found; using the largest", label, len(boxes))
    box = max(boxes, key=lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    dlib = import_dlib()
    shape = landmark_predictor()(image, dlib.rectangle(*box))
    details = dlib.get_face_chip_details(shape, settings.chip_size, settings.chip_padding)
    chip = np.asarray(dlib.extract_image_chip(image, details), dtype=np.uint8)
    landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
    aligned = time.perf_counter()
    return DetectedFace(
        box=box,
        landmarks=landmarks,
        chip=chip,
        chip_landmarks=_to_chip(landmarks, details),
        n_faces=len(boxes),
        seconds={"detect": detected - started, "align": aligned - detected},
    )


def _to_chip(points: np.ndarray, details: Any) -> np.ndarray:
    """Image points in chip pixels: dlib's get_mapping_to_chip, the chip rectangle rotated about its centre."""
    rect = details.rect
    centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    cos, sin = np.cos(details.angle), np.sin(details.angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    corners = np.array([[rect.left(), rect.top()], [rect.right(), rect.top()], [rect.right(), rect.bottom()]])
    source = (corners - centre) @ rotation.T + centre
    target = np.array([[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]], dtype=np.float64)
    affine = np.linalg.solve(np.hstack([source, np.ones((3, 1))]), target)
    return (np.hstack([points, np.ones((len(points), 1))]) @ affine).astype(np.float32)
