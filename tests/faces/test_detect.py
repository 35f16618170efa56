"""Detection, landmarks and alignment on real photos: one face, several faces, no face."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medlens.errors import ConfigError, MedlensError
from medlens.faces.detect import FacesConfig, NoFaceError, detect_face, find_faces, load_rgb


def _manifest(folder: Path) -> list[tuple[Path, int]]:
    with open(folder / "manifest.csv", newline="") as stream:
        return [(folder / row["filename"], int(row["expected_faces"])) for row in csv.DictReader(stream)]


def test_one_face_with_68_landmarks_inside_the_photo_and_a_150px_chip(lfw):
    photo = lfw / "Tony_Blair" / "Tony_Blair_0004.jpg"
    face = detect_face(photo)
    height, width = load_rgb(photo)[0].shape[:2]
    assert face.n_faces == 1
    assert face.landmarks.shape == (68, 2)
    assert (face.landmarks >= 0).all()
    assert (face.landmarks[:, 0] < width).all() and (face.landmarks[:, 1] < height).all()
    left, top, right, bottom = face.box
    assert 0 <= left < right < width and 0 <= top < bottom < height
    assert face.chip.shape == (150, 150, 3) and face.chip.dtype == np.uint8
    # Aligned: the eyes (iBUG 36-41 and 42-47) sit level and in the upper half of the chip.
    eyes = face.chip_landmarks[36:42].mean(axis=0), face.chip_landmarks[42:48].mean(axis=0)
    assert abs(eyes[0][1] - eyes[1][1]) < 3 and eyes[0][1] < 75 and eyes[0][0] < eyes[1][0]
    assert set(face.seconds) == {"detect", "align"}


def test_chip_size_and_the_same_photo_as_bytes_or_array(lfw):
    photo = lfw / "Serena_Williams" / sorted(p.name for p in (lfw / "Serena_Williams").glob("*.jpg"))[0]
    settings = FacesConfig(chip_size=96)
    from_path = detect_face(photo, settings)
    assert from_path.chip.shape == (96, 96, 3)
    from_bytes = detect_face(photo.read_bytes(), settings, name="upload.jpg")
    from_array = detect_face(load_rgb(photo)[0], settings)
    assert np.array_equal(from_path.chip, from_bytes.chip) and np.array_equal(from_path.chip, from_array.chip)


def test_no_face_photos_raise_naming_the_photo(shared_data):
    probes = _manifest(shared_data / "face-probes" / "noface")
    assert len(probes) == 5
    for photo, expected in probes:
        assert expected == 0
        with pytest.raises(NoFaceError, match=photo.name) as caught:
            detect_face(photo)
        assert isinstance(caught.value, MedlensError) and "upsample" in str(caught.value)


def test_several_faces_are_counted_and_the_largest_is_used(shared_data):
    for photo, expected in _manifest(shared_data / "face-probes" / "multiface"):
        face = detect_face(photo)
        boxes = find_faces(load_rgb(photo)[0])
        assert face.n_faces == expected == len(boxes), photo.name
        areas = [(r - le + 1) * (b - t + 1) for le, t, r, b in boxes]
        assert face.box == boxes[int(np.argmax(areas))]


@pytest.mark.parametrize(
    ("settings", "match"),
    [({"detector": "haar"}, "hog, cnn"), ({"upsample": 5}, "0..3"), ({"chip_size": 8}, ">= 32"), ({"pad": 1}, "valid")],
)
def test_bad_detector_settings_name_the_valid_ones(settings, match):
    with pytest.raises(ConfigError, match=match):
        FacesConfig.from_dict(settings)


def test_the_cnn_detector_finds_the_same_face(lfw):
    photo = lfw / "Tony_Blair" / "Tony_Blair_0004.jpg"
    hog = detect_face(photo)
    cnn = detect_face(photo, FacesConfig(detector="cnn", upsample=0))
    assert cnn.n_faces == 1
    centre = lambda box: np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])  # noqa: E731
    assert np.linalg.norm(centre(hog.box) - centre(cnn.box)) < 20
