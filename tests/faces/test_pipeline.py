"""train_face_head, FacePredictor, face configs and the ``faces`` CLI, end to end on the LFW stand-in."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from medlens.cli import main
from medlens.configs import find_config, shipped_configs
from medlens.errors import CheckpointError, ConfigError
from medlens.faces.cli import add_parser
from medlens.faces.detect import NoFaceError
from medlens.faces.heads import UnknownClassError
from medlens.faces.pipeline import (
    FACE_KIND,
    FacePredictor,
    evaluate_faces,
    is_face_config,
    load_face_config,
    train_face_head,
    train_from_config,
)

FACE_CONFIG = find_config("syndromes12-dlib")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="medlens")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def svm_run(lfw, lfw_batch, face_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("svm-run")
    return train_face_head(lfw, out, "svm", cache_dir=face_cache, progress=False), out


def test_training_writes_a_self_describing_checkpoint_and_metrics(svm_run):
    result, out = svm_run
    assert result.checkpoint == out / "best"
    assert sorted(p.name for p in out.iterdir()) == ["best", "metrics.json", "predictions.csv", "splits.csv"]
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["task"] == "multiclass" and manifest["kind"] == FACE_KIND
    assert manifest["model"]["head"] == "svm" and len(manifest["labels"]) == 15
    assert manifest["detector"] == {"detector": "hog", "upsample": 1, "chip_size": 150, "chip_padding": 0.25}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_test"] + metrics["n_no_face"] == 499
    assert metrics["metrics"]["accuracy"] >= 0.9 and set(metrics["metrics"]["top_k"]) == {"top_1", "top_3", "top_5"}
    assert len(metrics["metrics"]["confusion"]) == 15 and "recall" in metrics["metrics"]["per_class"]["Tony_Blair"]
    assert metrics["ms_per_image"] == {}  # every photo came from the session's cache


def test_predictor_gives_every_class_top_k_faces_and_landmarks(svm_run, lfw, shared_data):
    predictor = FacePredictor.from_checkpoint(svm_run[1])
    found = predictor.predict_image(lfw / "Serena_Williams" / "Serena_Williams_0001.jpg", k=3)
    assert set(found.probabilities) == set(predictor.labels)
    assert sum(found.probabilities.values()) == pytest.approx(1.0)
    assert found.top_k[0][0] == "Serena_Williams" and len(found.top_k) == 3
    assert found.n_faces == 1 and found.landmarks.shape == (68, 2)
    assert json.loads(json.dumps(found.to_dict()))["top_k"][0]["label"] == "Serena_Williams"
    crowd = predictor.predict_image(shared_data / "face-probes" / "multiface" / "2009_004587.jpg")
    assert crowd.n_faces == 2
    with pytest.raises(NoFaceError):
        predictor.predict_image(shared_data / "face-probes" / "noface" / "rocket.jpg")


def test_predict_paths_leaves_no_face_rows_empty(svm_run, lfw, shared_data, face_cache):
    predictor = FacePredictor.from_checkpoint(svm_run[0].checkpoint)
    photos = [lfw / "Tony_Blair" / "Tony_Blair_0004.jpg", shared_data / "face-probes" / "noface" / "coffee.png"]
    probs, batch = predictor.predict_paths(photos, progress=False)
    assert probs.shape == (2, 15) and np.isnan(probs[1]).all() and batch.no_face == [photos[1]]
    assert predictor.labels[int(np.argmax(probs[0]))] == "Tony_Blair"


def test_explain_writes_an_occlusion_png(svm_run, lfw, tmp_path):
    predictor = FacePredictor.from_checkpoint(svm_run[1])
    photo = lfw / "Tony_Blair" / "Tony_Blair_0004.jpg"
    png = predictor.explain(photo, tmp_path / "map.png", target="Tony_Blair", patch_size=75, stride=75)
    assert png.startswith(b"\x89PNG") and (tmp_path / "map.png").read_bytes() == png
    with pytest.raises(UnknownClassError, match="Tony_Blair"):
        predictor.explain(photo, target="Marfan")


def test_an_image_model_checkpoint_is_refused(tmp_path):
    import torch

    from medlens.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "cnn", torch.nn.Linear(2, 2), {"model": {"name": "resnet50"}, "labels": ["a", "b"]})
    with pytest.raises(CheckpointError, match="Predictor"):
        FacePredictor.from_checkpoint(tmp_path / "cnn")


def test_ready_face_configs_load_and_check_their_keys():
    faces = [p for p in shipped_configs().values() if is_face_config(p)]
    assert FACE_CONFIG in faces and not is_face_config(find_config("syndromes12"))
    for path in faces:
        config = load_face_config(path)
        assert config.kind == FACE_KIND and config.head.name == "svm"
    assert load_face_config(FACE_CONFIG, ["head.name=logistic", "head.params={}"]).head.name == "logistic"
    with pytest.raises(ConfigError, match=r"data\.source"):
        load_face_config(FACE_CONFIG, ["data.sources=x"])
    with pytest.raises(ConfigError, match="valid parameters"):
        load_face_config(FACE_CONFIG, ["head.params.kernel=rbf"])
    with pytest.raises(ConfigError, match="hog, cnn"):
        load_face_config(FACE_CONFIG, ["faces.detector=haar"])


def test_train_from_config_saves_the_config_beside_the_run(tiny_faces, face_cache, tmp_path):
    config = load_face_config(FACE_CONFIG, [f"data.source={tiny_faces}", f"data.cache={face_cache}"])
    result = train_from_config(config, tmp_path / "run", progress=False)
    assert load_face_config(tmp_path / "run" / "config.yaml").data.source == str(tiny_faces)
    assert result.metrics["n_test"] >= 2 and result.metrics["head_params"]["class_weight"] == "balanced"


def test_cli_embed_train_predict_explain(tiny_faces, face_cache, lfw, tmp_path, capsys):
    assert _cli(["faces", "embed", str(tiny_faces), "--cache", str(face_cache)]) == 0
    assert "10 photos, 10 already cached, 0 without a face" in capsys.readouterr().out
    run = tmp_path / "run"
    train = ["faces", "train", str(tiny_faces), "--out", str(run), "--head", "logistic", "--cache", str(face_cache)]
    assert _cli(train) == 0
    assert "logistic: accuracy" in capsys.readouterr().out
    photo = sorted((lfw / "Tony_Blair").glob("*.jpg"))[-1]
    assert _cli(["faces", "predict", str(run), str(photo), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["top_k"][0]["label"] == "Tony_Blair" and len(answer["landmarks"]) == 68
    rocket = lfw.parent / "face-probes" / "noface" / "rocket.jpg"
    assert _cli(["faces", "predict", str(run), str(photo), str(rocket)]) == 1
    captured = capsys.readouterr()
    assert "Tony_Blair" in captured.out and "rocket.jpg: no face found" in captured.err
    png = tmp_path / "map.png"
    assert _cli(["faces", "explain", str(run), str(photo), "--out", str(png), "--patch", "75", "--stride", "75"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_evaluate_and_predict_commands_accept_a_face_checkpoint(
    svm_run, lfw, shared_data, face_cache, tmp_path, capsys
):
    _, out = svm_run
    split = pd.read_csv(out / "splits.csv")
    assert set(split["split"]) == {"train", "test"} and split.groupby("patient_id")["split"].nunique().max() == 1
    metrics = evaluate_faces(out, tmp_path / "eval", cache_dir=face_cache, n_resamples=50, progress=False)
    assert metrics["n_images"] == (split["split"] == "test").sum()
    assert metrics["accuracy"] >= 0.9 and {"top_3", "top_5"} <= set(metrics["top_k"])
    assert len(metrics["confusion"]) == 15 and {"recall"} <= set(metrics["per_class"]["Tony_Blair"])
    assert main(["evaluate", str(out), "--out", str(tmp_path / "cli-eval"), "--resamples", "20"]) == 0
    assert "without a face" in capsys.readouterr().out

    photo = next((lfw / "Tony_Blair").glob("*.jpg"))
    cat = shared_data / "face-probes" / "noface" / "chelsea.png"
    csv = tmp_path / "faces.csv"
    assert main(["predict", str(out), str(photo), str(cat), "--out", str(csv)]) == 0
    rows = pd.read_csv(csv)
    assert rows["top_class"].iloc[0] == "Tony_Blair" and rows["n_faces"].tolist() == [1, 0]
    assert rows["error"].iloc[1] == "no face found"
    assert abs(rows.filter(like="prob_").iloc[0].sum() - 1) < 1e-6


def test_aligned_chips_feed_the_cnn_route(tiny_faces, shared_data, tmp_path, capsys):
    aligned = tmp_path / "aligned"
    assert main(["faces", "align", str(tiny_faces), "--out", str(aligned)]) == 0
    assert "wrote 10 aligned chips" in capsys.readouterr().out
    chips = sorted(aligned.glob("*/*.png"))
    assert len(chips) == 10 and {p.parent.name for p in chips} == {"Tony_Blair", "Serena_Williams"}
    assert pd.read_csv(aligned / "metadata.csv")["path"].tolist() == [str(p.relative_to(aligned)) for p in chips]
    overrides = ["model.name=tiny", "data.image_size=64", "train.epochs=1", "train.batch_size=4",
                 "data.val_fraction=0.3", "data.test_fraction=0.2", f"data.source={aligned}"]  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", "syndromes12", "--out", str(run), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert json.loads((run / "best" / "manifest.json").read_text())["labels"] == ["Serena_Williams", "Tony_Blair"]
