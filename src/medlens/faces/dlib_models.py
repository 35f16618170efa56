"""dlib and its pretrained face models, found without importing ``face_recognition_models``.

The face-recognition-models distribution ships four dlib model files in its ``models/`` folder. Importing
the package runs ``pkg_resources``, which setuptools >= 81 no longer has, so the folder is located through
the import system's spec (which finds a package without running it) or the distribution's file list.
dlib itself is imported only when a model is first loaded; each model is loaded once per process.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from medlens.extras import MissingExtraError, install_hint, require

INSTALL_HINT = install_hint("faces")
MODELS_PACKAGE = "face_recognition_models"
MODELS_DISTRIBUTION = "face-recognition-models"
MODEL_FILES = {
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}
"""Short names of the pretrained files, as :func:`model_path` takes them."""


class FaceModelsUnavailableError(MissingExtraError):
    """The pretrained dlib face models (of the 'faces' extra) are not installed."""


def models_folder() -> Path:
    """The ``models/`` folder of the installed face-recognition-models, without importing the package."""
    for folder in _candidate_folders():
        if (folder / MODEL_FILES["descriptor"]).is_file():
            return folder
    raise FaceModelsUnavailableError(
        f"the pretrained dlib face models ({MODELS_DISTRIBUTION}) are not installed: {INSTALL_HINT}"
    )


def _candidate_folders() -> list[Path]:
    # find_spec on a top-level name locates the package on sys.path; it does not execute __init__.py.
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    folders = [Path(p) / "models" for p in (spec.submodule_search_locations or [])] if spec else []
    try:
        files = importlib.metadata.files(MODELS_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    folders += [Path(str(f.locate())).parent for f in files if f.name == MODEL_FILES["descriptor"]]
    return folders


def model_path(name: str) -> Path:
    """The file of one pretrained model: ``landmarks68``, ``landmarks5``, ``descriptor`` or ``cnn_detector``."""
    if name not in MODEL_FILES:
        raise ValueError(f"unknown dlib face model {name!r}; valid names: {', '.join(MODEL_FILES)}")
    path = models_folder() / MODEL_FILES[name]
    if not path.is_file():
        raise FaceModelsUnavailableError(
            f"{path} is missing from the installed {MODELS_DISTRIBUTION}; reinstall it: "
            f"pip install --force-reinstall {MODELS_DISTRIBUTION}"
        )
    return path


def import_dlib() -> ModuleType:
    """dlib, or an error saying which extra installs it."""
    return require("dlib", extra="faces")


@functools.cache
def hog_detector() -> Any:
    """dlib's frontal-face HOG + linear SVM detector (no model file)."""
    return import_dlib().get_frontal_face_detector()


@functools.cache
def cnn_detector() -> Any:
    """dlib's MMOD CNN face detector: finds more faces at more angles, and is far slower on CPU."""
    return import_dlib().cnn_face_detection_model_v1(str(model_path("cnn_detector")))


@functools.cache
def landmark_predictor() -> Any:
    """The 68-point iBUG shape predictor."""
    return import_dlib().shape_predictor(str(model_path("landmarks68")))


@functools.cache
def descriptor_model() -> Any:
    """The ResNet that maps an aligned 150x150 face chip to a 128-d descriptor."""
    return import_dlib().face_recognition_model_v1(str(model_path("descriptor")))
