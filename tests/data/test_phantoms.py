"""The synthetic phantoms: deterministic, both layouts readable, boxes that are the masks' boxes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medlens.data.phantoms import (
    FINDING_RATE,
    FINDINGS,
    LUNG_MASKS,
    NORMAL,
    SITES,
    generate_phantoms,
    load_phantom_masks,
)
from medlens.data.records import load_source, read_nih_boxes
from medlens.errors import ConfigError, DataSourceError


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory) -> Path:
    return generate_phantoms(tmp_path_factory.mktemp("multilabel"), n=200, size=64, seed=0, progress=False)


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory) -> Path:
    return generate_phantoms(
        tmp_path_factory.mktemp("multiclass"), n=60, task="multiclass", size=64, seed=0, progress=False
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    first = _files(generate_phantoms(tmp_path / "a", n=10, size=64, seed=3, progress=False))
    again = _files(generate_phantoms(tmp_path / "b", n=10, size=64, seed=3, progress=False))
    other = _files(generate_phantoms(tmp_path / "c", n=10, size=64, seed=4, progress=False))
    assert first == again
    assert first != other
    images = [name for name in first if name.startswith("images/")]
    assert any(first[name] != other.get(name) for name in images)


def test_an_image_does_not_depend_on_how_many_are_generated(tmp_path, multilabel):
    few = generate_phantoms(tmp_path, n=5, size=64, seed=0, progress=False)
    for path in pd.read_csv(few / "labels.csv")["path"]:
        assert (few / path).read_bytes() == (multilabel / path).read_bytes()


def test_multilabel_layout_and_columns(multilabel):
    table = pd.read_csv(multilabel / "labels.csv", dtype={"patient_id": str})
    assert list(table.columns) == ["path", "labels", "patient_id", "sex", "age", "view", "source"]
    assert len(table) == 200
    assert table["path"].str.fullmatch(r"images/ph\d{5}_\d{3}\.png").all()
    assert all((multilabel / p).is_file() for p in table["path"])
    assert table["path"].is_unique
    assert set(table["sex"]) == {"F", "M"} and set(table["view"]) == {"AP", "PA"}
    assert table["age"].between(18, 90).all()
    for cell in table["labels"]:
        assert cell == "No Finding" or set(cell.split("|")) <= set(FINDINGS)
    records = load_source(multilabel)
    assert records.task == "multilabel" and sorted(records.label_names) == sorted(FINDINGS)


def test_multiclass_layout_and_columns(multiclass):
    table = pd.read_csv(multiclass / "metadata.csv", dtype={"patient_id": str})
    assert list(table.columns) == ["path", "label", "patient_id", "sex", "age", "view", "source"]
    assert set(table["label"]) == {NORMAL, *FINDINGS}
    for path, label in zip(table["path"], table["label"], strict=True):
        assert path.split("/")[0] == label and (multiclass / path).is_file()
    records = load_source(multiclass)
    assert records.task == "multiclass" and sorted(records.label_names) == sorted([NORMAL, *FINDINGS])
    boxes = read_nih_boxes(multiclass / "BBox_List_2017.csv")
    normals = {Path(p).name for p in table.loc[table["label"] == NORMAL, "path"]}
    assert not normals & set(boxes["image"])


def test_patients_have_about_1_3_images_and_a_fixed_sex_and_age(multilabel):
    table = pd.read_csv(multilabel / "labels.csv", dtype={"patient_id": str})
    assert table["patient_id"].str.fullmatch(r"P\d{5}").all()
    per_patient = table.groupby("patient_id").size()
    assert 1.15 <= per_patient.mean() <= 1.45
    assert per_patient.max() >= 2
    assert (table.groupby("patient_id")[["sex", "age"]].nunique() == 1).all().all()


def test_every_finding_appears_at_about_its_rate(multilabel):
    labels = pd.read_csv(multilabel / "labels.csv")["labels"]
    for finding in FINDINGS:
        rate = labels.str.split("|").apply(lambda cell, f=finding: f in cell).mean()
        assert abs(rate - FINDING_RATE) < 0.1, (finding, rate)
    assert 0.18 <= (labels == "No Finding").mean() <= 0.4


def test_boxes_are_the_masks_bounding_boxes_in_the_nih_layout(multilabel):
    csv = multilabel / "BBox_List_2017.csv"
    assert csv.read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    raw = pd.read_csv(csv)  # like NIH's own file: the header's brackets hold commas, so pandas sees 9 columns
    assert raw.shape[1] == 9 and raw.iloc[:, 6:].isna().all().all()
    boxes = read_nih_boxes(csv)
    table = pd.read_csv(multilabel / "labels.csv")
    expected = {
        (Path(path).name, finding)
        for path, cell in zip(table["path"], table["labels"], strict=True)
        for finding in cell.split("|")
        if finding != "No Finding"
    }
    assert set(zip(boxes["image"], boxes["finding"], strict=True)) == expected
    for name, finding, x, y, w, h in boxes.itertuples(index=False):
        mask = load_phantom_masks(multilabel, name)[finding]
        ys, xs = np.nonzero(mask)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_masks_are_binary_and_not_trivial(multilabel):
    areas = {finding: [] for finding in FINDINGS}
    for path in sorted((multilabel / "masks").glob("*.png")):
        stem, finding = path.stem.split("__")
        mask = load_phantom_masks(multilabel, f"{stem}.png")[finding]
        assert mask.dtype == bool and mask.shape == (64, 64)
        areas[finding].append(int(mask.sum()))
    for finding, values in areas.items():
        assert min(values) >= 6, (finding, min(values))  # 64 px images: the smallest nodule is ~2 px across
        assert max(values) < 64 * 64 / 4, (finding, max(values))
    assert np.median(areas["cardiomegaly"]) > np.median(areas["nodule"])


def test_a_normal_image_has_no_masks_and_an_unknown_one_is_an_error(multiclass):
    normal = next((multiclass / NORMAL).glob("*.png"))
    assert load_phantom_masks(multiclass, f"{NORMAL}/{normal.name}") == {}
    with pytest.raises(DataSourceError, match=r"ph99999_000\.png"):
        load_phantom_masks(multiclass, "ph99999_000.png")


def test_the_images_look_like_radiographs(multilabel):
    from medlens.data.readers import read_image

    pixels = read_image(multilabel / "images" / "ph00001_000.png")
    assert pixels.shape == (64, 64)
    lungs = pixels[20:40, [14, 50]].mean()
    mediastinum = pixels[20:40, 30:34].mean()
    assert mediastinum > lungs + 0.15  # dark lung fields either side of a bright middle
    assert pixels.std() > 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "segmentation"}, "task must be one of ('multiclass', 'multilabel'), not 'segmentation'"),
        ({"n": 0}, "number of phantoms must be at least 1 image, not 0"),
        ({"size": 32}, "size must be at least 64 pixels, not 32"),
    ],
)
def test_bad_arguments_name_the_value(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_phantoms(tmp_path, progress=False, **kwargs)


def test_sites_are_per_patient_and_lung_masks_cover_the_lungs(multiclass):
    table = pd.read_csv(multiclass / "metadata.csv", dtype={"patient_id": str})
    assert set(table["source"]) <= set(SITES)
    assert (table.groupby("patient_id")["source"].nunique() == 1).all(), "a patient comes from one site"
    for path in table["path"][:5]:
        lungs = np.asarray(Image.open(multiclass / LUNG_MASKS / Path(path).name)) > 127
        assert 0.2 < lungs.mean() < 0.6, "two lung fields: a good part of the film, far from all of it"
        assert not lungs[:, :3].any() and not lungs[:3].any(), "the lungs stay clear of the outer band"


def test_a_marker_set_stamps_each_class_site_in_its_corner(tmp_path, multiclass):
    marked = generate_phantoms(tmp_path, n=60, task="multiclass", size=64, seed=0, progress=False, marker=True)
    table = pd.read_csv(marked / "metadata.csv")
    assert (table["source"] == "site-" + table["label"]).all(), "each class comes from a site of its own"
    corners = {0: (slice(1, 4), slice(1, 4)), 1: (slice(1, 4), slice(60, 63)), 2: (slice(60, 63), slice(1, 4))}
    for path, label in zip(table["path"], table["label"], strict=True):
        pixels = np.asarray(Image.open(marked / path))
        site = (NORMAL, *FINDINGS).index(label)
        if site in corners:
            assert (pixels[corners[site]] == 255).all(), (path, label)
        plain = np.asarray(Image.open(multiclass / path))
        assert (pixels != plain).mean() < 0.01, "only the stamp differs from the honest set's image"
    with pytest.raises(ConfigError, match="multiclass"):
        generate_phantoms(tmp_path / "bad", n=4, task="multilabel", size=64, progress=False, marker=True)
