"""The pretrained dlib files are found without importing face_recognition_models; absences say what to do."""

from __future__ import annotations

import sys

import pytest

from medlens.extras import MissingExtraError
from medlens.faces import dlib_models
from medlens.faces.dlib_models import MODEL_FILES, FaceModelsUnavailableError, model_path, models_folder


def test_model_files_found_without_importing_the_package(monkeypatch):
    monkeypatch.delitem(sys.modules, dlib_models.MODELS_PACKAGE, raising=False)
    folder = models_folder()
    assert dlib_models.MODELS_PACKAGE not in sys.modules
    for name, filename in MODEL_FILES.items():
        path = model_path(name)
        assert path == folder / filename and path.stat().st_size > 100_000


def test_the_distribution_file_list_finds_them_too(monkeypatch):
    monkeypatch.setattr(dlib_models.importlib.util, "find_spec", lambda name: None)
    assert (models_folder() / MODEL_FILES["descriptor"]).is_file()


def test_absent_models_give_the_install_hint(monkeypatch):
    monkeypatch.setattr(dlib_models, "MODELS_PACKAGE", "no_such_face_models")
    monkeypatch.setattr(dlib_models, "MODELS_DISTRIBUTION", "no-such-face-models")
    with pytest.raises(FaceModelsUnavailableError, match=r"pip install 'medlens\[faces\]'"):
        models_folder()


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="landmarks68"):
        model_path("landmarks81")


def test_absent_dlib_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(MissingExtraError, match=r"needs the 'faces' extra: pip install 'medlens\[faces\]'"):
        dlib_models.import_dlib()
