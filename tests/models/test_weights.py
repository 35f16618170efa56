"""Weights bring their preprocessing and their record: sidecars, config keys, torchxrayvision's files (read
without that package and without running their pickles), and frozen parts that stay frozen once loaded."""

from __future__ import annotations

import json
import os
import sys
import types
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medlens.config import load_config
from medlens.data.transforms import prepare_image, resize_image, view_box
from medlens.errors import CheckpointError, ConfigError
from medlens.io import file_sha256
from medlens.models import Classifier, WeightsUnavailableError, apply_strategy, create_model, param_groups
from medlens.models.xrv import XRV_WEIGHTS, xrv_folder

SIDE = 64
XRV_STD = 1.0 / 2048.0


# torchxrayvision's DenseNet as its released files pickle it: nn.Sequential subclasses named as in that package.
class _DenseLayer(nn.Sequential):
    def __init__(self, width: int, growth: int = 32):
        super().__init__()
        for name, module in (
            ("norm1", nn.BatchNorm2d(width)),
            ("relu1", nn.ReLU(inplace=True)),
            ("conv1", nn.Conv2d(width, 4 * growth, 1, bias=False)),
            ("norm2", nn.BatchNorm2d(4 * growth)),
            ("relu2", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)),
        ):
            self.add_module(name, module)


class _DenseBlock(nn.Sequential):
    def __init__(self, layers: int, width: int, growth: int = 32):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(width + i * growth, growth))


class _Transition(nn.Sequential):
    def __init__(self, width: int):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(width))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(width, width // 2, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 18):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False),
                norm0=nn.BatchNorm2d(64),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(3, stride=2, padding=1),
            )
        )
        width = 64
        for i, layers in enumerate((6, 12, 24, 16)):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(layers, width))
            width += layers * 32
            if i < 3:
                self.features.add_module(f"transition{i + 1}", _Transition(width))
                width //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(width))
        self.classifier = nn.Linear(width, num_classes)
        self.register_buffer("op_threshs", torch.rand(num_classes))
        self.pathologies = ["Atelectasis"] * num_classes


XRV_CLASSES = (DenseNet, _DenseLayer, _DenseBlock, _Transition)


class _OldBackend:
    """What a module pickled by PyTorch 0.4-1.x kept as ``_backend``: a call of a torch no-op."""

    def __reduce__(self):
        from torch.nn.backends import thnn

        return (thnn._get_thnn_function_backend, ())


@pytest.fixture(scope="module")
def xrv_densenet() -> DenseNet:
    """A torchxrayvision-style DenseNet-121 with every weight and BatchNorm statistic random."""
    torch.manual_seed(3)
    model = DenseNet()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model


def _save_as_torchxrayvision(obj: object, path, monkeypatch, legacy: bool = False) -> None:
    """``torch.save`` with the classes importable as ``torchxrayvision.models``; that package is gone after."""
    package, models = types.ModuleType("torchxrayvision"), types.ModuleType("torchxrayvision.models")
    package.models = models
    with monkeypatch.context() as patch:
        for cls in XRV_CLASSES:
            patch.setattr(cls, "__module__", models.__name__)
            setattr(models, cls.__name__, cls)
        patch.setitem(sys.modules, package.__name__, package)
        patch.setitem(sys.modules, models.__name__, models)
        with warnings.catch_warnings():  # the old format's note that a test class has no source file
            warnings.simplefilter("ignore", UserWarning)
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert "torchxrayvision" not in sys.modules


def _assert_loaded(model: Classifier, source: dict[str, torch.Tensor], skip: tuple[str, ...]) -> None:
    ours = model.backbone.state_dict()
    expected = {k: v for k, v in source.items() if not k.startswith(skip) and k != "op_threshs"}
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], v) for k, v in expected.items())


def _assert_xrv_preprocessing(model: Classifier, side: int) -> None:
    assert model.mean == (0.5,) and model.std == (XRV_STD,) and model.input_size == (1, side, side)
    p = model.preprocessing
    assert (p.resize, p.input_scaling, p.source) == ("centre-crop", "[-1024, 1024]", "torchxrayvision")


@pytest.mark.parametrize("kind", ["module", "legacy-module", "state-dict"])
def test_torchxrayvision_densenet_files_load_as_released(kind, xrv_densenet, tmp_path, monkeypatch):
    path = tmp_path / "xrv.pt"
    if kind == "state-dict":
        torch.save(xrv_densenet.state_dict(), path)
    else:
        if kind == "legacy-module":
            monkeypatch.setattr(xrv_densenet.features.norm5, "_backend", _OldBackend(), raising=False)
        _save_as_torchxrayvision(xrv_densenet, path, monkeypatch, legacy=kind == "legacy-module")
    model = create_model("densenet121", num_classes=3, pretrained=f"xrv:{path}")
    _assert_loaded(model, xrv_densenet.state_dict(), skip=("classifier.",))
    _assert_xrv_preprocessing(model, 224)
    form = "xrv-state-dict" if kind == "state-dict" else "xrv-module"
    assert model.weights_info == {"source": f"xrv:{path}", "format": form, "sha256": file_sha256(path)}


def test_a_plain_path_to_a_torchxrayvision_module_says_how_to_read_it(xrv_densenet, tmp_path, monkeypatch):
    _save_as_torchxrayvision(xrv_densenet, tmp_path / "xrv.pt", monkeypatch)
    with pytest.raises(CheckpointError, match=r"refused.*pretrained: xrv:"):
        create_model("densenet121", num_classes=2, pretrained=tmp_path / "xrv.pt")


@pytest.fixture
def xrv_home(tmp_path, monkeypatch):
    """An empty home folder, so torchxrayvision's download folder is inside the test's own."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return xrv_folder()


def test_named_weights_come_from_torchxrayvisions_folder_and_frozen_parts_stay_put(
    xrv_densenet, xrv_home, monkeypatch
):
    release = XRV_WEIGHTS["densenet121-res224-all"]
    xrv_home.mkdir(parents=True)
    _save_as_torchxrayvision(xrv_densenet, xrv_home / release.file, monkeypatch)
    model = create_model("densenet121", num_classes=2, pretrained="xrv:densenet121-res224-all")
    _assert_loaded(model, xrv_densenet.state_dict(), skip=("classifier.",))
    _assert_xrv_preprocessing(model, 224)
    assert model.weights_info["source"] == "xrv:densenet121-res224-all"
    assert model.weights_info["format"] == "xrv-module"

    for strategy, last_n in (("head", 0), ("last_n", 2)):
        moved = _train_step(apply_strategy(model, strategy, last_n=last_n))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert moved <= trained | _training_buffers(model)
        assert {n for n in moved if n.startswith("head.")}, "the head must train"
        if strategy == "head":
            assert not [n for n in moved if n.startswith("backbone.")]
        else:
            assert [n for n in moved if n.startswith("backbone.features.denseblock4.denselayer16.")]


def _train_step(model: Classifier) -> set[str]:
    """One SGD step on a random batch; the names of the parameters and buffers it changed."""
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.SGD(param_groups(model, lr=0.5), lr=0.5)
    x = torch.randn(2, model.in_chans, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    # Targets of 0.5 keep a gradient even where random weights saturate the logits.
    loss = nn.functional.binary_cross_entropy_with_logits(model.train()(x), torch.full((2, model.num_classes), 0.5))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    after = dict([*model.named_parameters(), *model.named_buffers()])
    return {n for n, t in before.items() if not torch.equal(t, after[n])}


def _training_buffers(model: Classifier) -> set[str]:
    """Statistics of the BatchNorm layers that train (frozen ones are kept in eval mode)."""
    return {
        f"{path}.{name}"
        for path, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.training
        for name, _ in module.named_buffers()
    }


def test_torchxrayvision_resnet_state_dict_loads_at_512(xrv_home):
    source = torchvision.models.resnet50(num_classes=18)
    source.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)  # as torchxrayvision patches it
    xrv_home.mkdir(parents=True)
    torch.save(source.state_dict(), xrv_home / XRV_WEIGHTS["resnet50-res512-all"].file)
    model = create_model("resnet50", num_classes=2, pretrained="xrv:resnet50-res512-all")
    _assert_loaded(model, source.state_dict(), skip=("fc.",))
    _assert_xrv_preprocessing(model, 512)
    assert model.weights_info["format"] == "xrv-state-dict"


def test_missing_torchxrayvision_weights_say_where_to_put_them(xrv_home):
    release = XRV_WEIGHTS["densenet121-res224-chex"]
    with pytest.raises(WeightsUnavailableError) as caught:
        create_model("densenet121", num_classes=2, pretrained="xrv:densenet121-res224-chex")
    message = str(caught.value)
    assert "\n" not in message and f"{xrv_home}/" in message and release.file in message
    assert "xrv:/path/to/" in message


@pytest.mark.parametrize(
    ("pretrained", "match"),
    [
        ("xrv:densenet121-res224-everything", "densenet121-res224-all, densenet121-res224-nih"),
        ("xrv:resnet50-res512-all", "set model.name: resnet50"),
    ],
)
def test_torchxrayvision_names_are_checked_before_anything_is_built(pretrained, match, xrv_home):
    with pytest.raises(ConfigError, match=match):
        create_model("densenet121", num_classes=2, pretrained=pretrained)


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_torchxrayvision_file_whose_pickle_runs_code_is_refused(legacy, tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"features.conv0.weight": torch.zeros(1), "payload": _Shell(marker)},
        tmp_path / "evil.pt",
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError, match=r"refused to load: it names (posix|os)\.system"):
        create_model("densenet121", num_classes=2, pretrained=f"xrv:{tmp_path / 'evil.pt'}")
    assert not marker.exists()


def test_a_torchscript_archive_is_not_torchxrayvision_weights(tmp_path):
    with warnings.catch_warnings():  # torch.jit.script is deprecated, and a deprecated format is the point
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(CheckpointError, match="TorchScript"):
        create_model("densenet121", num_classes=2, pretrained=f"xrv:{tmp_path / 'scripted.pt'}")


def test_torchxrayvision_preprocessing_is_its_crop_and_scale():
    """Centre square (torchxrayvision's offsets), resize, and x / 255 * 2048 - 1024 from mean and std."""
    pixels = np.random.default_rng(0).random((101, 60), dtype=np.float32)
    assert view_box(pixels, 0.0, "centre-crop") == (20, 80, 0, 60)  # 101 // 2 - 60 // 2 = 20
    prepared = prepare_image(pixels, 32, resize="centre-crop")
    expected = np.rint(resize_image(pixels[20:80], 32) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(prepared, expected)
    scaled = (prepared / 255.0 - 0.5) / XRV_STD
    np.testing.assert_allclose(scaled, prepared / 255.0 * 2048.0 - 1024.0, atol=1e-9)
    assert scaled.min() >= -1024 and scaled.max() <= 1024


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A timm-format state dict of timm's test ResNet, RGB stem and classifier included."""
    torch.manual_seed(4)
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "resnet.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def _sidecar(path, **keys) -> None:
    path.with_name(path.name + ".json").write_text(json.dumps(keys))


def test_a_sidecar_says_the_preprocessing(timm_file, tmp_path, recwarn):
    path = tmp_path / "resnet.pth"
    path.write_bytes(timm_file[0].read_bytes())
    _sidecar(path, architecture="test_resnet", mean=[0.4, 0.5, 0.6], std=[0.3], input_size=96)
    model = create_model("test_resnet", num_classes=2, in_chans=3, pretrained=path)
    assert (model.mean, model.std, model.input_size) == ((0.4, 0.5, 0.6), (0.3, 0.3, 0.3), (3, 96, 96))
    assert model.preprocessing.source == "sidecar" and model.preprocessing.resize == "squash"
    assert model.weights_info == {"source": str(path), "format": "timm-state-dict", "sha256": file_sha256(path)}
    _assert_loaded(model, timm_file[1], skip=("fc.",))
    assert not [w for w in recwarn if "assumed" in str(w.message)]

    _sidecar(path, input_scaling="[-1024, 1024]", resize="centre-crop")
    model = create_model("test_resnet", num_classes=2, pretrained=path)
    assert (model.mean, model.std, model.preprocessing.resize) == ((0.5,), (XRV_STD,), "centre-crop")


def test_config_keys_say_it_and_win_over_a_sidecar(timm_file, tmp_path, recwarn):
    path = tmp_path / "resnet.pth"
    path.write_bytes(timm_file[0].read_bytes())
    m = load_config(None, ["model.mean=[0.2]", "model.std=[0.25]", "model.input_size=80"]).model
    model = create_model("test_resnet", 2, pretrained=path, mean=m.mean, std=m.std, input_size=m.input_size)
    assert (model.mean, model.std, model.input_size) == ((0.2,), (0.25,), (1, 80, 80))
    assert model.preprocessing.source == "config"
    assert not [w for w in recwarn if "assumed" in str(w.message)]

    _sidecar(path, mean=[0.7], std=[0.1], input_size=48)
    model = create_model("test_resnet", num_classes=2, pretrained=path, std=[0.2])
    assert (model.mean, model.std, model.input_size) == ((0.7,), (0.2,), (1, 48, 48))


def test_a_file_without_preprocessing_keeps_the_architectures_with_a_warning(timm_file):
    with pytest.warns(UserWarning, match=r"default is assumed .* sidecar .*resnet\.pth\.json"):
        model = create_model("test_resnet", num_classes=2, pretrained=timm_file[0])
    default = create_model("test_resnet", num_classes=2)
    assert (model.mean, model.std, model.input_size) == (default.mean, default.std, default.input_size)
    assert model.preprocessing.source == "architecture" and default.weights_info is None


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"architecture": "resnet50"}, "set model.name: resnet50"),
        ({"means": [0.5]}, "unknown key 'means'; valid keys: architecture, mean"),
        ({"input_scaling": "[0, 255]"}, r"input_scaling '\[0, 255\]' is not one of"),
        ({"input_scaling": "[-1, 1]", "mean": [0.5]}, "not both"),
        ({"std": [0.0]}, "std must be positive"),
    ],
)
def test_a_wrong_sidecar_says_what_is_wrong(keys, match, timm_file, tmp_path):
    path = tmp_path / "resnet.pth"
    path.write_bytes(timm_file[0].read_bytes())
    _sidecar(path, **keys)
    with pytest.raises(CheckpointError, match=match):
        create_model("test_resnet", num_classes=2, pretrained=path)


@pytest.mark.parametrize(
    ("keys", "match"),
    [({"mean": [0.1, 0.2]}, "list of 1 or 3 numbers"), ({"input_size": 0}, "input_size must be a side")],
)
def test_wrong_config_keys_say_what_is_wrong(keys, match):
    with pytest.raises(ConfigError, match=match):
        create_model("test_resnet", num_classes=2, **keys)
