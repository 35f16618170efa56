"""The device path, proven without a GPU: the training step, validation, the loaded model's forward and a CAM
run with the model on PyTorch's ``meta`` device, where any tensor made on the CPU raises exactly as it would on
a GPU ("Tensor on device cpu is not on the expected device meta"). Also: device and precision choices, bf16
on the CPU, and running out of device memory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_run

from medlens.cli import main
from medlens.config import load_config
from medlens.data.cache import ImageCache, build_cache
from medlens.data.phantoms import generate_phantoms
from medlens.data.records import load_source
from medlens.errors import UsageError
from medlens.explain.cam import CamExplainer
from medlens.inference import NetworkModel
from medlens.jobs.train import train
from medlens.models import create_model
from medlens.models.checkpoint import load_weights, read_manifest
from medlens.training import fit
from medlens.training.batches import DeviceBatches, augment, device_generator
from medlens.training.data import RunData
from medlens.training.engine import Engine, resolve_device, resolve_precision
from medlens.training.fit import TrainState, train_step, validation_outputs
from medlens.training.losses import make_loss

META = torch.device("meta")
DEVICE_MISMATCH = "is not on the expected device meta"


@pytest.fixture(scope="module")
def run_data(tmp_path_factory) -> RunData:
    root = tmp_path_factory.mktemp("device")
    generate_phantoms(root / "images", n=12, task="multilabel", size=64, progress=False)
    table = load_source(root / "images")
    build_cache(table.paths, root / "cache", 32, 1, workers=1)
    cache = ImageCache(root / "cache")
    rows = np.arange(len(table))
    return RunData(table, {"train": rows[:8], "val": rows[8:]}, cache, cache.indices_of([str(p) for p in table.paths]))


def _meta_state(data: RunData, optimizer: str) -> TrainState:
    model = create_model("tiny", num_classes=len(data.table.label_names)).to(META)
    make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = make(model.parameters(), lr=1e-3, **({"momentum": 0.9} if optimizer == "sgd" else {}))
    loss_fn = make_loss(data.table.task, data.table.labels[data.splits["train"]], True, False, 0.0).to(META)
    return TrainState(model, model, opt, None, loss_fn)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_training_step_runs_on_the_meta_device(run_data, optimizer):
    state, engine = _meta_state(run_data, optimizer), Engine(device=META)
    rows = run_data.splits["train"]
    feed = DeviceBatches(lambda chunk: fit._host_batch(run_data, chunk), [rows[:4], rows[4:]], META)
    for images, labels, _ in feed:  # uint8 from the cache, moved to the device: normalised and augmented there
        assert images.device == META and images.dtype == torch.uint8 and labels.device == META
        loss = train_step(state, engine, images, labels, "xray", 1.0, device_generator(META, 0))
        assert loss.device == META and loss.shape == ()
    assert all(p.device == META for p in state.model.parameters())


def test_validation_and_its_loss_run_on_the_meta_device(run_data):
    logits, loss = validation_outputs(_meta_state(run_data, "sgd"), run_data, Engine(device=META))
    assert logits.device == loss.device == META and logits.shape == (4, len(run_data.table.label_names))


def test_a_cpu_tensor_in_the_step_is_caught(run_data):
    """The control: the same check fails loudly for code that draws its random numbers on the CPU."""
    x = torch.zeros(2, 1, 32, 32, device=META)
    with pytest.raises(RuntimeError, match=DEVICE_MISMATCH):
        _ = x * torch.rand(2).view(-1, 1, 1, 1)  # no device=: a CPU tensor meets a device one
    assert augment(x, "face", 1.0, device_generator(META, 0)).device == META  # augment draws on x's device


def _meta_model(tmp_path) -> NetworkModel:
    network = create_model("tiny", num_classes=3)
    preprocessing = {"image_size": 32, "channels": 1, "mean": list(network.mean), "std": list(network.std)}
    manifest = {"task": "multilabel", "labels": ["a", "b", "c"], "model": {"name": "tiny"},
                "preprocessing": preprocessing}  # fmt: skip
    return NetworkModel(network, manifest, device=META)


def test_the_loaded_model_and_a_cam_run_on_the_meta_device(tmp_path):
    model = _meta_model(tmp_path)
    prepared = [model.prepare(np.random.default_rng(0).random((40, 40), dtype=np.float32))]
    x = model.prepared_tensor(prepared)  # uint8 to the device, normalised there
    assert x.device == META and model.forward(x).device == META
    # The CAM's forward runs on the device with its hooks until pytorch-grad-cam copies the activations to
    # the host (on a GPU a plain device-to-host copy; the meta device holds no data to copy).
    with CamExplainer(model.network, "gradcam") as explainer, pytest.raises(NotImplementedError, match="meta"):
        explainer(x, 0)


def test_bf16_logits_on_the_cpu_are_close_to_fp32():
    torch.manual_seed(0)
    network = create_model("tiny", num_classes=4)
    preprocessing = {"image_size": 64, "channels": 1, "mean": list(network.mean), "std": list(network.std)}
    manifest = {"task": "multiclass", "labels": list("abcd"), "model": {"name": "tiny"}, "preprocessing": preprocessing}
    images = [np.random.default_rng(i).random((64, 64), dtype=np.float32) for i in range(8)]
    fp32 = NetworkModel(network, manifest).predict_images(images)
    bf16 = NetworkModel(network, manifest, precision="bf16").predict_images(images)
    assert np.abs(bf16 - fp32).max() < 0.02  # probabilities: bf16 keeps ~3 significant digits


def test_devices_and_precisions_are_chosen_or_refused_by_name():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")  # no GPU here
    for missing in ("cuda", "cuda:1", "mps"):
        if missing.split(":")[0] == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(UsageError, match="this machine has: cpu"):
            resolve_device(missing)
    with pytest.raises(UsageError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")
    assert resolve_precision("auto", torch.device("cpu")) == "32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UsageError, match="fp16 training needs a GPU"):
        resolve_precision("16", torch.device("cpu"))


def test_the_device_is_printed_written_to_history_and_recorded(tmp_path, caplog):
    caplog.set_level("INFO", logger="medlens")
    train(load_config(None, tiny_run("train.epochs=1", "train.export_onnx=false")), tmp_path / "run", progress=False)
    assert "training on cpu, precision 32" in caplog.text
    assert pd.read_csv(tmp_path / "run" / "history.csv")["device"].tolist() == ["cpu"]
    manifest = read_manifest(tmp_path / "run" / "best")
    assert (manifest["device"], manifest["precision"], manifest["processes"]) == ("cpu", "32", 1)
    assert main(["evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "e"), "--device", "cuda:7"]) == 1


def test_out_of_memory_names_a_batch_size_that_fits_and_resume_goes_on(tmp_path, monkeypatch, capsys):
    overrides = tiny_run("train.epochs=2", "train.batch_size=16", "train.export_onnx=false")
    run = tmp_path / "run"
    train(load_config(None, [*overrides, "train.epochs=1"]), run / "first", progress=False)
    before = load_weights(run / "first" / "last")
    step = fit.train_step

    def small_memory(state, engine, images, *args, **kwargs):
        if len(images) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(state, engine, images, *args, **kwargs)

    monkeypatch.setattr(fit, "train_step", small_memory)
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(run / "first"), "--resume", *sets]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error.startswith("medlens: error: out of memory at batch size 16 on cpu") and "batch size 4 fits" in error
    assert "--resume --set train.batch_size=4" in error
    after = load_weights(run / "first" / "last")
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed epoch touched the checkpoint"
    again = load_config(None, [*overrides, "train.batch_size=4"])
    train(again, run / "first", resume=True, progress=False)
    assert len(pd.read_csv(run / "first" / "history.csv")) == 2


@pytest.fixture(autouse=True)
def _empty_config(tmp_path):
    (tmp_path / "c.yaml").write_text("{}\n")
