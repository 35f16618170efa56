"""Every mistake a user can make is one line and exit status 1; every train route succeeds with status 0.

Mistakes in the config, the model name or the weights source are found before any image is read or cached:
their runs point at a real image folder and must leave no cache behind. How fast those answers come, process
start included, is measured by ``benchmarks/cli_errors.py`` (it runs these same cases as ``python -m medlens``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import face_probe, tiny_run

from medlens.cli import main
from medlens.data.phantoms import generate_phantoms
from medlens.models import create_model
from medlens.models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mistakes")
    (root / "empty").mkdir()
    (root / "broken.yaml").write_text("model: [name: tiny\n")
    (root / "a-file").write_text("not a folder\n")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"\0" * 16)
    model = create_model("tiny", num_classes=2)
    spec = {"name": "tiny", "num_classes": 2, "in_chans": 1, "head": "linear", "head_hidden": [], "head_dropout": 0}
    preprocessing = {"image_size": 32, "channels": 1, "mean": list(model.mean), "std": list(model.std)}
    manifest = {"task": "multiclass", "labels": ["a", "b"], "model": spec, "preprocessing": preprocessing,
                "data": {"source": str(root / "gone"), "kind": "folder"}}  # fmt: skip
    save_checkpoint(root / "ckpt", model, manifest)
    (root / "run" / "last").mkdir(parents=True)
    generate_phantoms(root / "images", n=4, task="multiclass", size=64, progress=False)
    (root / "config.yaml").write_text(f"data:\n  source: {root / 'images'}\nmodel:\n  name: tiny\n")
    names = ("empty", "config.yaml", "broken.yaml", "a-file", "corrupt", "ckpt", "run", "images")
    return {name: root / name for name in names}


def _train(places, *sets: str, out: str | Path = "out") -> list[str]:
    return ["train", str(places["config.yaml"]), "--out", str(out), *[a for s in sets for a in ("--set", s)]]


# (name, argv from the places, what the one line must name)
NO_DATA = [
    ("unknown model", lambda p: _train(p, "model.name=resnet5000"), "resnet5000"),
    ("unknown key", lambda p: _train(p, "train.lrr=1"), "train.lrr"),
    ("bad value", lambda p: _train(p, "train.epochs=many"), "train.epochs"),
    ("not key=value", lambda p: _train(p, "train.lr"), "key=value"),
    ("strategy/last_n clash", lambda p: _train(p, "model.strategy=full", "model.last_n=2"), "last_n"),
    ("bad choice", lambda p: _train(p, "train.optimizer=lion"), "train.optimizer"),
    ("split fractions", lambda p: _train(p, "data.val_fraction=0.6", "data.test_fraction=0.5"), "val_fraction"),
    ("missing config", lambda p: ["train", str(p["empty"] / "nope.yaml"), "--out", "x"],
     "neither a file nor a shipped config"),
    ("broken yaml", lambda p: ["train", str(p["broken.yaml"]), "--out", "x"], "not valid YAML"),
    ("hub offline", lambda p: _train(p, "model.pretrained=true"), "model.pretrained"),
    *[(f"{name} offline", lambda p, name=name: ["train", name, "--data", str(p["images"]), "--out", "out"],
       "model.pretrained: /path/to/weights.safetensors")
      for name in ("cxr4", "nih14", "nih14-densenet121", "syndromes12")],  # shipped configs start from hub weights
    ("missing weights file", lambda p: _train(p, f"model.pretrained={p['empty']}/w.safetensors"), "w.safetensors"),
    ("run exists", lambda p: _train(p, out=p["run"]), "--resume"),
    ("out is a file", lambda p: _train(p, "data.source=/nonexistent", out=p["a-file"] / "run"), "another --out"),
    ("corrupt checkpoint", lambda p: ["predict", str(p["corrupt"]), str(p["empty"])], "manifest"),
    ("not a checkpoint", lambda p: ["evaluate", str(p["empty"]), "--out", "e"], "not a checkpoint"),
    ("missing image", lambda p: ["predict", str(p["ckpt"]), str(p["empty"] / "x.png"), "--out", "p.csv"], "x.png"),
    ("image-less folder", lambda p: ["predict", str(p["ckpt"]), str(p["empty"]), "--out", "p.csv"], "no images"),
    ("unknown heatmap method", lambda p: ["explain", str(p["ckpt"]), str(p["a-file"]), "--out", "h", "--method", "x"],
     "gradcam"),
    ("bad phantom count", lambda p: ["data", "phantoms", "--out", str(p["empty"] / "ph"), "--n", "0"], "at least 1"),
    ("one fold", lambda p: [*_train(p, "data.source=/nonexistent"), "--folds", "1"], "--folds"),
    ("trained data gone", lambda p: ["evaluate", str(p["ckpt"]), "--out", "e"], "--data"),
    ("bad port", lambda p: ["serve", str(p["ckpt"]), "--port", "70000"], "--port"),
]  # fmt: skip
WITH_DATA = [
    ("missing source", lambda p: _train(p, "data.source=/nonexistent/source"), "/nonexistent/source"),
    ("empty source folder", lambda p: _train(p, f"data.source={p['empty']}"), "empty"),
    ("none of the model's labels", lambda p: ["evaluate", str(p["ckpt"]), "--data", str(p["images"]), "--out", "e"],
     "none of the model's labels (a, b)"),
]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m medlens ARGV`` as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the hub is not reachable here; say so at once
    return subprocess.run([sys.executable, "-m", "medlens", *argv], cwd=cwd, env=env, capture_output=True, text=True)


def _assert_one_line(status: int, stderr: str, named: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert status == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("medlens: error: "), stderr
    assert named in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("name", "argv", "named"), NO_DATA, ids=[case[0] for case in NO_DATA])
def test_a_mistake_found_before_the_data_is_one_line(places, tmp_path, monkeypatch, capsys, name, argv, named):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = main(argv(places))
    _assert_one_line(status, capsys.readouterr().err, named)
    assert not list(tmp_path.rglob("cache.json")), f"{name}: images were cached before the mistake was found"


@pytest.mark.parametrize(("name", "argv", "named"), WITH_DATA, ids=[case[0] for case in WITH_DATA])
def test_a_mistake_in_the_data_is_one_line(places, tmp_path, monkeypatch, capsys, name, argv, named):
    monkeypatch.chdir(tmp_path)
    _assert_one_line(main(argv(places)), capsys.readouterr().err, named)


@pytest.mark.parametrize("name", ["unknown model", "corrupt checkpoint", "hub offline"])
def test_the_command_itself_exits_1_without_a_traceback(places, tmp_path, name):
    argv, named = next((a, n) for case, a, n in NO_DATA if case == name)
    done = _run(argv(places), tmp_path)
    _assert_one_line(done.returncode, done.stderr, named)


def test_a_port_in_use_is_named(places, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run(["serve", str(places["ckpt"]), "--port", str(port)], tmp_path)
    _assert_one_line(done.returncode, done.stderr, str(port))


def test_verbose_shows_the_traceback_too(places, tmp_path):
    done = _run(["-v", *_train(places, "model.name=resnet5000")], tmp_path)
    assert done.returncode == 1 and "Traceback" in done.stderr and "medlens: error: " in done.stderr


@pytest.mark.parametrize(
    "route",
    ["classifier", "cross-validation", "face probe"],
)
def test_every_train_route_exits_0(route, tmp_path, request, capsys):
    if route == "face probe":
        shared = request.getfixturevalue("shared_data")
        pytest.importorskip("dlib", reason="face probes need dlib: pip install dlib-bin face-recognition-models")
        faces = tmp_path / "faces"
        for person in ("Tony_Blair", "Serena_Williams"):
            (faces / person).mkdir(parents=True)
            for photo in sorted((shared / "faces-lfw15" / person).glob("*.jpg"))[:6]:
                (faces / person / photo.name).symlink_to(photo)
        overrides = face_probe(faces)
    else:
        overrides = tiny_run("train.epochs=1", "data.phantoms.n=48", "train.export_onnx=false")
    argv = ["train", "demo", "--out", str(tmp_path / "r")]
    argv += [a for o in overrides for a in ("--set", o)]
    if route == "cross-validation":
        argv += ["--folds", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert ("ensemble checkpoint" if route == "cross-validation" else "checkpoint: ") in printed
