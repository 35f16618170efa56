"""``medlens explain`` end to end on a tiny phantom checkpoint, and on real NIH boxes where they exist."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import short_real_run, tiny_run
from PIL import Image

from medlens.cli import main
from medlens.config import load_config
from medlens.configs import find_config
from medlens.data.records import read_nih_boxes
from medlens.errors import ConfigError, DataSourceError
from medlens.jobs.explain import explain_images, score_demo
from medlens.jobs.train import train

TINY = tiny_run("data.image_size=64", "data.phantoms.size=96", "train.epochs=1")


def _cli(argv: list[str]) -> int:
    return main(argv)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("explain") / "run"
    train(load_config(None, TINY), run, progress=False)
    return run


@pytest.fixture
def few_images(phantom_run, tmp_path) -> Path:
    """Four phantoms with boxes, copied into a folder of their own."""
    phantoms = phantom_run / "phantoms"
    boxed = read_nih_boxes(phantoms / "BBox_List_2017.csv")["image"].unique()[:4]
    folder = tmp_path / "images"
    folder.mkdir()
    for name in boxed:
        shutil.copy(phantoms / "images" / name, folder / name)
    return folder


def test_explain_cli_writes_overlays_maps_index_and_scores(phantom_run, few_images, tmp_path, capsys):
    out = tmp_path / "out"
    boxes_csv = phantom_run / "phantoms" / "BBox_List_2017.csv"
    argv = ["explain", str(phantom_run), str(few_images), "--out", str(out), "--boxes", str(boxes_csv)]
    assert _cli([*argv, "--tolerance", "15"]) == 0
    printed = capsys.readouterr().out
    assert "scores.json" in printed and "index.html" in printed

    scores = json.loads((out / "scores.json").read_text())
    boxes = read_nih_boxes(boxes_csv)
    names = {p.name for p in few_images.iterdir()}
    expected = {(r.image, r.finding) for r in boxes.itertuples() if r.image in names}
    assert {(m["image"], m["finding"]) for m in scores["maps"]} == expected
    assert scores["method"] == "gradcam" and scores["tolerance"] == 15
    assert scores["summary"]["all"]["n"] == len(expected)
    for row in scores["summary"].values():
        assert 0.0 <= row["pointing"] <= 1.0 and 0.0 <= row["energy"] <= 1.0

    index = (out / "index.html").read_text()
    links = re.findall(r'(?:href|src)="([^"]+)"', index)
    assert links and all(not Path(link).is_absolute() and (out / link).is_file() for link in links)
    for image, finding in expected:
        stem = f"{Path(image).stem}__{finding}"
        heatmap = np.load(out / f"{stem}.npy")
        assert heatmap.shape == (64, 64) and heatmap.dtype == np.float32
        assert np.isfinite(heatmap).all() and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
        with Image.open(out / f"{stem}.png") as overlay, Image.open(few_images / image) as original:
            assert overlay.width > original.width and overlay.height > original.height
        assert finding in index


def test_a_named_label_is_explained_on_every_image(phantom_run, few_images, tmp_path):
    result = explain_images(phantom_run, [few_images], tmp_path / "out", labels=["nodule"], progress=False)
    assert result["n_maps"] == result["n_images"] == 4 and result["scores"] is None
    assert {m["finding"] for m in result["maps"]} == {"nodule"}
    assert not (tmp_path / "out" / "scores.json").exists()


def test_without_labels_each_image_gets_its_positive_or_top_finding(phantom_run, few_images, tmp_path):
    result = explain_images(phantom_run, sorted(few_images.iterdir())[:2], tmp_path / "out", progress=False)
    assert result["n_images"] == 2 and result["n_maps"] >= 2


def test_bad_labels_methods_and_images_say_what_is_valid(phantom_run, few_images, tmp_path):
    with pytest.raises(ConfigError, match="nodule"):
        explain_images(phantom_run, [few_images], tmp_path, labels=["Nodule"], progress=False)
    with pytest.raises(ConfigError, match="gradcam"):
        explain_images(phantom_run, [few_images], tmp_path, method="gradcam3", progress=False)
    with pytest.raises(DataSourceError, match="does not exist"):
        explain_images(phantom_run, [tmp_path / "missing.png"], tmp_path, progress=False)


def test_score_demo_scores_the_test_split_against_the_masks(phantom_run):
    summary = score_demo(phantom_run)
    splits = pd.read_csv(phantom_run / "splits.csv")
    assert summary["all"]["n"] > 0 and len(splits[splits["split"] == "test"]) > 0
    for row in summary.values():
        assert 0.0 <= row["pointing"] <= 1.0 and 0.0 <= row["energy"] <= 1.0


@pytest.mark.shared
def test_real_nih_boxes_are_scored(shared_data, tmp_path, capsys):
    nih = shared_data / "nih14"
    run = tmp_path / "run"
    overrides = short_real_run(nih, tmp_path / "cache")
    train(load_config(find_config("nih14"), overrides), run, progress=False)
    boxes = read_nih_boxes(nih / "BBox_List_2017.csv")
    images = [nih / "images" / name for name in boxes["image"].unique()]
    out = tmp_path / "out"
    argv = ["explain", str(run), *map(str, images), "--out", str(out), "--boxes", str(nih / "BBox_List_2017.csv")]
    assert _cli(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    boxed = set(zip(boxes["image"], boxes["finding"], strict=True))
    assert len(boxes) == 17
    assert {(m["image"], m["finding"]) for m in scores["maps"]} == boxed
    for m in scores["maps"]:
        assert 0.0 <= m["energy"] <= 1.0 and m["hit"] in (True, False)
    assert set(scores["summary"]) == {*boxes["finding"], "all"}
