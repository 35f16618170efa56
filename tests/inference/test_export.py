"""ONNX export: parity with torch, the backend chosen from the manifest's record, stale graphs refused."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_run
from safetensors.torch import load_file, save_file

from medlens.backends import ONNX_FILE, ORT_SPINNING
from medlens.cli import main
from medlens.config import load_config
from medlens.errors import CheckpointError
from medlens.extras import MissingExtraError
from medlens.inference import NetworkModel, load_model
from medlens.jobs.export import PARITY_TOLERANCE, export_onnx
from medlens.jobs.train import train
from medlens.models.checkpoint import read_manifest, update_manifest
from medlens.serve.schemas import Limits
from medlens.serve.service import load_served_model

TINY = tiny_run("data.phantoms.n=48", "train.epochs=1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained tiny checkpoint with model.onnx, exported once for the module (tests copy it to change it)."""
    run = tmp_path_factory.mktemp("export") / "run"
    train(load_config(None, TINY), run, progress=False)
    report = export_onnx(run, batch_size=4, repeats=1)
    return run, report


@pytest.fixture
def checkpoint(exported, tmp_path):
    """A private copy of the exported checkpoint folder."""
    run, _ = exported
    return shutil.copytree(run / "best", tmp_path / "best")


def _say_faster(folder, backend: str) -> None:
    update_manifest(folder, onnx={**read_manifest(folder)["onnx"], "faster": backend})


def test_export_writes_a_graph_within_tolerance_and_records_it(exported):
    run, report = exported
    assert (run / "best" / ONNX_FILE).is_file() and not (run / "best" / f".{ONNX_FILE}.tmp").exists()
    assert report.parity_source == "generated" and report.parity_max_abs_diff <= PARITY_TOLERANCE
    assert report.torch_img_s > 0 and report.onnxruntime_img_s > 0
    record = read_manifest(run)["onnx"]
    assert record["faster"] in ("torch", "onnxruntime") and record["opset"] >= 17
    assert len(record["sha256"]) == 64 and len(record["weights_sha256"]) == 64


def test_parity_on_real_chest_xrays(checkpoint, shared_data):
    images = sorted((shared_data / "nih14" / "images").glob("*.png"))[:8]
    report = export_onnx(checkpoint, images, batch_size=4, repeats=1)
    assert report.parity_source == "real" and report.parity_images == 8
    assert report.parity_max_abs_diff <= PARITY_TOLERANCE
    on_torch = load_model(checkpoint, backend="torch")
    x = on_torch.to_tensor([on_torch.read(p) for p in images[:3]])
    torch_logits = on_torch.forward(x)
    onnx_logits = load_model(checkpoint, backend="onnxruntime").forward(x)
    np.testing.assert_allclose(onnx_logits.numpy(), torch_logits.numpy(), atol=PARITY_TOLERANCE)


def test_auto_takes_onnxruntime_only_when_it_was_faster(checkpoint):
    _say_faster(checkpoint, "onnxruntime")
    assert load_model(checkpoint).backend == "onnxruntime"
    _say_faster(checkpoint, "torch")
    assert load_model(checkpoint).backend == "torch"


def test_a_backend_can_be_forced_by_argument_or_environment(checkpoint, monkeypatch):
    _say_faster(checkpoint, "torch")
    assert load_model(checkpoint, backend="onnxruntime").backend == "onnxruntime"
    monkeypatch.setenv("MEDLENS_BACKEND", "onnxruntime")
    assert load_model(checkpoint).backend == "onnxruntime"
    _say_faster(checkpoint, "onnxruntime")
    monkeypatch.setenv("MEDLENS_BACKEND", "torch")
    assert load_model(checkpoint).backend == "torch"
    monkeypatch.setenv("MEDLENS_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match=r"'tensorrt'.*\('auto', 'torch', 'onnxruntime'\)"):
        load_model(checkpoint)


def test_predict_cli_gives_the_same_probabilities_on_both_backends(exported, tmp_path):
    run, _ = exported
    images = sorted((run / "phantoms" / "images").glob("*.png"))[:10]
    tables = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.csv"
        argv = ["predict", str(run), *map(str, images), "--out", str(out), "--batch-size", "4", "--backend", backend]
        assert main(argv) == 0
        tables[backend] = pd.read_csv(out)
    assert tables["torch"]["path"].tolist() == tables["onnxruntime"]["path"].tolist()
    np.testing.assert_allclose(
        tables["onnxruntime"].filter(like="prob_").to_numpy(),
        tables["torch"].filter(like="prob_").to_numpy(),
        atol=1e-4,
    )


def test_the_served_model_predicts_on_onnxruntime_and_still_draws_heatmaps(exported, monkeypatch):
    from medlens.serve.schemas import Limits
    from medlens.serve.service import PredictOptions, load_served_model

    run, _ = exported
    upload = sorted((run / "phantoms" / "images").glob("*.png"))[0].read_bytes()
    limits = Limits(max_upload_bytes=10**7, max_pixels=10**7, request_seconds=60)
    answers = {}
    for backend in ("torch", "onnxruntime"):
        monkeypatch.setenv("MEDLENS_BACKEND", backend)
        served = load_served_model(run, limits)
        try:
            assert served.model.backend == backend
            answers[backend] = served.predict(upload, PredictOptions(cam=True))
        finally:
            served.close()
    assert answers["onnxruntime"].heatmaps
    probs = {backend: {f.label: f.probability for f in answer.findings} for backend, answer in answers.items()}
    assert probs["onnxruntime"] == pytest.approx(probs["torch"], abs=1e-5)


@pytest.mark.parametrize("damage", ["corrupt", "other_graph", "retrained", "missing"])
def test_a_stale_or_damaged_graph_is_never_used(checkpoint, tmp_path, damage, caplog):
    _say_faster(checkpoint, "onnxruntime")
    graph = checkpoint / ONNX_FILE
    if damage == "corrupt":
        graph.write_bytes(graph.read_bytes()[:1000])
    elif damage == "other_graph":
        other = shutil.copytree(checkpoint, tmp_path / "other")
        export_onnx(other, batch_size=2, repeats=1, opset=17)
        graph.write_bytes((other / ONNX_FILE).read_bytes())
    elif damage == "retrained":
        weights = load_file(checkpoint / "model.safetensors")
        save_file(
            {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, checkpoint / "model.safetensors"
        )
    else:
        graph.unlink()
    with caplog.at_level(logging.WARNING, logger="medlens.backends"):
        assert load_model(checkpoint).backend == "torch"
    assert "re-export with: medlens export" in caplog.text
    with pytest.raises(CheckpointError, match="re-export with: medlens export"):
        load_model(checkpoint, backend="onnxruntime")


def test_forcing_onnxruntime_without_an_export_says_how_to_make_one(exported, tmp_path):
    run, _ = exported
    bare = shutil.copytree(run / "best", tmp_path / "bare")
    (bare / ONNX_FILE).unlink()
    manifest = read_manifest(bare)
    manifest.pop("onnx")
    (bare / "manifest.json").write_text(json.dumps(manifest))
    assert load_model(bare).backend == "torch"
    with pytest.raises(CheckpointError, match="has no ONNX export; create one with: medlens export"):
        load_model(bare, backend="onnxruntime")


def test_an_exported_checkpoint_runs_torch_where_onnx_runtime_is_not_installed(checkpoint, monkeypatch, caplog):
    _say_faster(checkpoint, "onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as without the 'onnx' extra
    monkeypatch.setattr("medlens.backends.installed", lambda *modules: False)
    with caplog.at_level(logging.WARNING, logger="medlens.backends"):
        assert load_model(checkpoint).backend == "torch"
    assert "pip install 'medlens[onnx]'" in caplog.text
    with pytest.raises(CheckpointError, match=r"ONNX Runtime is not installed here: pip install 'medlens\[onnx\]'"):
        load_model(checkpoint, backend="onnxruntime")
    with pytest.raises(MissingExtraError, match=r"needs the 'onnx' extra: pip install 'medlens\[onnx\]'"):
        export_onnx(checkpoint)


def test_export_cli_reports_parity_and_speed(checkpoint, capsys):
    assert main(["export", str(checkpoint), "--format", "onnx", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed and "predict and serve will use" in printed


def test_training_ends_with_an_export_and_a_failed_one_only_warns(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    train(load_config(None, TINY), run, progress=False)
    record = read_manifest(run)["onnx"]
    validation = (pd.read_csv(run / "splits.csv")["split"] == "val").sum()
    assert (run / "best" / ONNX_FILE).is_file()
    assert record["parity_source"] == "real" and record["parity_images"] == min(32, validation)
    assert record["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert load_model(run).backend == record["faster"]  # auto: the one that measured faster

    # A real parity miss (no tolerance at all): the run still succeeds, as a torch checkpoint, and says why.
    monkeypatch.setattr("medlens.jobs.export.PARITY_TOLERANCE", -1.0)
    missed = tmp_path / "missed"
    with caplog.at_level(logging.WARNING, logger="medlens"):
        train(load_config(None, TINY), missed, progress=False)
    assert "was not exported to ONNX (CheckpointError" in caplog.text
    assert not list((missed / "best").glob("*.onnx*")) and "onnx" not in read_manifest(missed)
    assert load_model(missed).backend == "torch"

    skipped = tmp_path / "skipped"
    train(load_config(None, [*TINY, "train.export_onnx=false"]), skipped, progress=False)
    assert not (skipped / "best" / ONNX_FILE).exists() and "onnx" not in read_manifest(skipped)


def test_the_server_lets_onnx_runtime_threads_sleep_between_requests(checkpoint):
    def spinning(predictor: NetworkModel) -> str:
        options = predictor.onnx.session.get_session_options()
        try:
            return options.get_session_config_entry(ORT_SPINNING)
        except RuntimeError as exc:  # a key never set: ONNX Runtime's default, spinning
            assert "does not have configuration with key" in str(exc)
            return "default"

    _say_faster(checkpoint, "onnxruntime")
    assert spinning(load_model(checkpoint)) == "default"
    served = load_served_model(checkpoint, Limits(max_upload_bytes=2**20, max_pixels=10**6, request_seconds=5))
    try:
        assert served.model.backend == "onnxruntime" and spinning(served.model) == "0"
    finally:
        served.close()
