"""Loaded models and batch prediction: same preprocessing as training, resumable CSV, bad files kept."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_run

from medlens.cli import main
from medlens.config import load_config
from medlens.data.cache import ImageCache
from medlens.inference import load_model
from medlens.jobs.train import train

TINY = tiny_run("data.phantoms.n=48", "train.epochs=1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    train(load_config(None, TINY), out, progress=False)
    return out


def test_predictor_sees_what_training_saw(run):
    predictor = load_model(run)
    cache = ImageCache(run / "cache")
    path = cache.paths[0]
    np.testing.assert_array_equal(predictor.prepare(predictor.read(path)), cache[0])
    probs = predictor.predict_paths([path, path])
    assert probs.shape == (2, len(predictor.labels)) and np.all((probs >= 0) & (probs <= 1))
    assert np.allclose(probs[0], probs[1])


def test_predict_cli_is_resumable_and_keeps_bad_files(run, tmp_path, capsys):
    images = sorted((run / "phantoms" / "images").glob("*.png"))[:6]
    folder = tmp_path / "in"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), str(folder / images[0].name), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 1
    assert main(["predict", str(run), str(folder), "--out", str(out), "--batch-size", "4"]) == 0
    table = pd.read_csv(out)
    assert len(table) == 7 and table["path"].is_unique  # the first image was not predicted twice
    broken = table[table["path"].str.endswith("broken.png")].iloc[0]
    assert "not a PNG" in broken["error"] and pd.isna(broken.filter(like="prob_")).all()
    good = table[table["error"].isna()]
    expected = load_model(run).predict_paths(good["path"])
    np.testing.assert_allclose(good.filter(like="prob_").to_numpy(), expected, atol=1e-5)
    assert "wrote 6 rows" in capsys.readouterr().out


def test_heatmaps_land_on_the_region_a_border_crop_kept(run):
    predictor = load_model(run)
    heatmap = np.zeros((8, 8), dtype=np.float32)
    heatmap[0, 7] = 1.0  # the model frame's top-right corner
    pixels = np.full((100, 200), 0.5, dtype=np.float32)
    assert predictor.in_image(heatmap, pixels) is heatmap  # no crop: the map as it is
    predictor.crop_border = 0.1  # 10 rows and 20 columns off each side
    framed = predictor.in_image(heatmap, pixels)
    assert framed.shape == (100, 200)
    assert framed[:10].max() == 0 and framed[90:].max() == 0 and framed[:, :20].max() == 0
    assert framed[:, 180:].max() == 0
    row, col = np.unravel_index(np.argmax(framed), framed.shape)
    assert 10 <= row < 20 and 170 <= col < 180  # the kept region's top-right corner, not the image's
