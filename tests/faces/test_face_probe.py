"""The face line as a probe: dlib embeddings under a head, trained, predicted, explained and evaluated through
the one config, the one train job and the one model contract, end to end on the LFW stand-in."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import face_probe

from medlens.cli import main
from medlens.config import load_config
from medlens.configs import find_config
from medlens.errors import CheckpointError, ConfigError
from medlens.inference import ProbeModel, load_model
from medlens.jobs.evaluate import evaluate
from medlens.jobs.train import train

pytestmark = pytest.mark.shared

FACE_CONFIG = find_config("syndromes12-dlib")


@pytest.fixture(scope="module")
def svm_run(lfw, lfw_batch, face_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("svm-run") / "run"
    config = load_config(FACE_CONFIG, [f"data.source={lfw}", f"data.cache={face_cache}"])
    return train(config, out, progress=False), out


def _scores(model, photo):
    return model.logits([model.prepare(model.read(photo))])


def test_training_writes_a_self_describing_checkpoint(svm_run, lfw_batch):
    scores, out = svm_run
    assert sorted(p.name for p in out.iterdir()) == ["best", "config.yaml", "splits.csv"]
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["task"] == "multiclass" and manifest["kind"] == "probe" and manifest["inputs"] == "face-photo"
    assert manifest["model"]["head"] == "svm" and len(manifest["labels"]) == 15
    assert manifest["embedder"]["faces"] == {"detector": "hog", "upsample": 1, "chip_size": 150, "chip_padding": 0.25}
    _, batch = lfw_batch
    assert len(pd.read_csv(out / "splits.csv")) == 499 and manifest["data"]["n_left_out"] == len(batch.no_face)
    assert manifest["temperature"] > 0 and manifest["temperature"] != 1.0  # calibrated on the validation split
    assert scores["val_accuracy"] >= 0.9 and manifest["metrics"] == scores


def test_held_out_photos_score_at_least_090(svm_run, tmp_path):
    _, out = svm_run
    split = pd.read_csv(out / "splits.csv")
    assert set(split["split"]) == {"train", "val", "test"} and split.groupby("patient_id")["split"].nunique().max() == 1
    metrics = evaluate(out, tmp_path / "eval", n_resamples=50, progress=False).metrics
    assert metrics["n_images"] + metrics["n_left_out"] == (split["split"] == "test").sum()
    assert metrics["accuracy"] >= 0.9 and {"top_3", "top_5"} <= set(metrics["top_k"])
    assert len(metrics["confusion"]) == 15 and {"recall"} <= set(metrics["per_class"]["Tony_Blair"])
    assert metrics["ece"] is not None and metrics["ece"] < 0.15


def test_the_model_gives_every_class_faces_and_landmarks(svm_run, lfw, shared_data):
    model = load_model(svm_run[1])
    assert isinstance(model, ProbeModel) and model.inputs == "face-photo" and model.cam_methods == ("occlusion",)
    scores = _scores(model, lfw / "Serena_Williams" / "Serena_Williams_0001.jpg")
    probs = model.probabilities(scores.values)[0]
    assert probs.shape == (15,) and probs.sum() == pytest.approx(1.0)
    assert model.positives(probs) == ["Serena_Williams"]
    assert scores.details[0]["n_faces"] == 1 and scores.details[0]["landmarks"].shape == (68, 2)
    crowd = _scores(model, shared_data / "face-probes" / "multiface" / "2009_004587.jpg")
    assert crowd.details[0]["n_faces"] == 2
    rocket = _scores(model, shared_data / "face-probes" / "noface" / "rocket.jpg")
    assert rocket.problems[0].code == "no_face" and np.isnan(rocket.values[0]).all()


def test_photo_files_without_a_face_get_nan_rows(svm_run, lfw, shared_data):
    model = load_model(svm_run[1] / "best")
    photos = [lfw / "Tony_Blair" / "Tony_Blair_0004.jpg", shared_data / "face-probes" / "noface" / "coffee.png"]
    scores = model.logits_paths(photos)
    assert scores.values.shape == (2, 15) and np.isnan(scores.values[1]).all()
    assert scores.problems[0] is None and scores.problems[1].code == "no_face"
    assert model.labels[int(np.argmax(scores.values[0]))] == "Tony_Blair"


def test_occlusion_heatmaps_over_the_aligned_face(svm_run, lfw):
    model = load_model(svm_run[1])
    photo = model.read(lfw / "Tony_Blair" / "Tony_Blair_0004.jpg")
    (heatmap,) = model.heatmaps(photo, [model.labels.index("Tony_Blair")], "occlusion", patch_size=75, stride=75)
    assert heatmap.map.shape == heatmap.backdrop.shape[:2] == (150, 150) and heatmap.marks.shape == (68, 2)
    assert np.isfinite(heatmap.map).all() and np.ptp(heatmap.map) > 0
    with pytest.raises(ConfigError, match="occlusion"):
        model.heatmaps(photo, [0], "gradcam")


def test_an_image_model_checkpoint_is_not_a_probe(tmp_path):
    import torch

    from medlens.models.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "cnn", torch.nn.Linear(2, 2), {"model": {"name": "resnet50"}, "labels": ["a", "b"]})
    with pytest.raises(CheckpointError, match="load_model"):
        ProbeModel.from_checkpoint(tmp_path / "cnn")


def test_the_face_config_is_one_config_checked_before_any_photo(tiny_faces, tmp_path):
    config = load_config(FACE_CONFIG)
    assert config.model.strategy == "probe" and config.model.name == "dlib_face" and config.model.probe == "svm"
    assert load_config(FACE_CONFIG, ["model.probe=logreg", "model.probe_params={}"]).model.probe == "logreg"
    with pytest.raises(ConfigError, match=r"data\.source"):
        load_config(FACE_CONFIG, ["data.sources=x"])
    with pytest.raises(ConfigError, match="hog, cnn"):
        load_config(FACE_CONFIG, ["faces.detector=haar"])
    bad = load_config(FACE_CONFIG, [f"data.source={tiny_faces}", "model.probe_params.kernel=rbf"])
    with pytest.raises(ConfigError, match="valid parameters"):
        train(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "embedding-cache").exists()  # refused before any photo was embedded


def test_the_config_is_saved_beside_the_run(tiny_faces, face_cache, tmp_path):
    config = load_config(FACE_CONFIG, face_probe(tiny_faces, f"data.cache={face_cache}"))
    train(config, tmp_path / "run", progress=False)
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.data.source == str(tiny_faces) and again.model.probe_params["class_weight"] == "balanced"
    assert load_model(tmp_path / "run").manifest["model"]["params"]["class_weight"] == "balanced"


def test_faces_alias_embed_train_predict_explain(tiny_faces, face_cache, lfw, tmp_path, capsys):
    assert main(["faces", "embed", str(tiny_faces), "--cache", str(face_cache)]) == 0
    assert "10 photos, 10 already cached, 0 without a face" in capsys.readouterr().out
    run = tmp_path / "run"
    argv = ["faces", "train", str(tiny_faces), "--out", str(run), "--head", "logreg", "--cache", str(face_cache)]
    assert main(argv) == 0
    assert "logreg: accuracy" in capsys.readouterr().out
    photo = sorted((lfw / "Tony_Blair").glob("*.jpg"))[-1]
    assert main(["faces", "predict", str(run), str(photo), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["top_k"][0]["label"] == "Tony_Blair" and len(answer["landmarks"]) == 68
    rocket = lfw.parent / "face-probes" / "noface" / "rocket.jpg"
    assert main(["faces", "predict", str(run), str(photo), str(rocket)]) == 1
    captured = capsys.readouterr()
    assert "Tony_Blair" in captured.out and "rocket.jpg: no face found" in captured.err
    png = tmp_path / "map.png"
    assert main(["faces", "explain", str(run), str(photo), "--out", str(png), "--patch", "75", "--stride", "75"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert main(["faces", "explain", str(run), str(photo), "--out", str(png), "--target", "Marfan"]) == 1
    assert "Tony_Blair" in capsys.readouterr().err


def test_train_evaluate_and_predict_commands_take_a_face_probe(svm_run, lfw, shared_data, tmp_path, capsys):
    _, out = svm_run
    assert main(["evaluate", str(out), "--out", str(tmp_path / "cli-eval"), "--resamples", "20"]) == 0
    assert "evaluated the run's 'test' split" in capsys.readouterr().out
    photo = next((lfw / "Tony_Blair").glob("*.jpg"))
    cat = shared_data / "face-probes" / "noface" / "chelsea.png"
    csv = tmp_path / "faces.csv"
    assert main(["predict", str(out), str(photo), str(cat), "--out", str(csv)]) == 0
    rows = pd.read_csv(csv)
    assert rows["top_class"].iloc[0] == "Tony_Blair" and rows["n_faces"].tolist() == [1, 0]
    assert rows["error"].iloc[1] == "no face found"
    assert abs(rows.filter(like="prob_").iloc[0].sum() - 1) < 1e-6


def test_aligned_chips_feed_the_cnn_route(tiny_faces, tmp_path, capsys):
    aligned = tmp_path / "aligned"
    assert main(["faces", "align", str(tiny_faces), "--out", str(aligned)]) == 0
    assert "wrote 10 aligned chips" in capsys.readouterr().out
    chips = sorted(aligned.glob("*/*.png"))
    assert len(chips) == 10 and {p.parent.name for p in chips} == {"Tony_Blair", "Serena_Williams"}
    assert pd.read_csv(aligned / "metadata.csv")["path"].tolist() == [str(p.relative_to(aligned)) for p in chips]
    config = find_config("syndromes12")
    overrides = ["model.name=tiny", "model.pretrained=false", "data.image_size=64", "train.epochs=1",
                 "train.batch_size=4", "data.val_fraction=0.3", "data.test_fraction=0.2",
                 f"data.source={aligned}"]  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert json.loads((run / "best" / "manifest.json").read_text())["labels"] == ["Serena_Williams", "Tony_Blair"]
