"""Every registered backbone through the same questions; heads, strategies, local and hub weights."""

from __future__ import annotations

import functools
import json
import socket
import time

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medlens.cli import main
from medlens.errors import CheckpointError, ConfigError
from medlens.models import (
    STRATEGIES,
    Classifier,
    WeightsUnavailableError,
    apply_strategy,
    create_model,
    describe_models,
    get_backbone_spec,
    list_models,
    param_groups,
)
from medlens.models import weights as weights_module
from medlens.models.weights import LOCAL_FILE_HINT, hub_reachable

SIDE = 64  # small enough for resnet50 on CPU, a multiple of every stride and of the ViT patch
SMALL = ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"]


@functools.cache
def built(name: str, in_chans: int = 1) -> Classifier:
    """Each big backbone is slow to build, so the sweeps share one instance per (name, in_chans).

    Tests that change it (strategies, train/eval) set every flag they check themselves.
    """
    torch.manual_seed(0)
    return create_model(name, num_classes=3, in_chans=in_chans)


def _trainable(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_registry_names_the_required_backbones():
    required = {"resnet50", "resnetv2_50", "densenet121", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224"}
    assert required | {"tiny"} <= set(list_models())


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigError, match="densenet121"):
        create_model("densenet12", num_classes=2)
    with pytest.raises(ConfigError, match=r"did you mean .*convnext_small.* any other name timm\.list_models\(\)"):
        create_model("convnext_smal", num_classes=2)
    with pytest.raises(ConfigError, match=r"model\.name: resnet50 and model\.pretrained: timm/resnet50\.a1_in1k"):
        create_model("resnet50.a1_in1k", num_classes=2)


@pytest.mark.parametrize("name", ["densenet169", "efficientnet_b3", "convnext_small", "swin_tiny_patch4_window7_224"])
def test_any_timm_name_is_a_backbone(name):
    spec = get_backbone_spec(name)
    assert spec.timm_name == name and spec.cam_layer is None and spec.layout is None  # derived when built


HAND_NAMED = {
    # The CAM layers medlens once listed by hand; derivation must find the same ones.
    "resnet50": ("layer4", "nchw"),
    "resnetv2_50": ("norm", "nchw"),
    "densenet121": ("features.norm5", "nchw"),
    "efficientnet_b0": ("bn2", "nchw"),
    "convnext_tiny": ("stages.3", "nchw"),
    "vit_small_patch16_224": ("blocks.11.norm1", "tokens"),
    "resnet18": ("layer4", "nchw"),
    "tiny": ("layer4", "nchw"),
    "test_resnet": ("layer4", "nchw"),
    "test_efficientnet": ("bn2", "nchw"),
    "test_convnext": ("stages.3", "nchw"),
    "test_vit": ("blocks.5.norm1", "tokens"),
}


@pytest.mark.parametrize("name", list(HAND_NAMED))
def test_derived_cam_layers_are_the_hand_named_ones(name):
    assert (built(name).spec.cam_layer, built(name).spec.layout) == HAND_NAMED[name]


def test_describe_models_and_the_cli_list_them(capsys):
    described = describe_models()
    names = [m["name"] for m in described["models"]]
    assert names == list_models() and all(m["summary"] for m in described["models"])
    assert "timm.list_models()" in described["any_timm_name"] and described["timm_models"] > 1000
    assert "xrv:densenet121-res224-all" in described["torchxrayvision_weights"]["names"]

    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == described
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in names) and "timm.list_models()" in text and "xrv:" in text


def test_a_backbone_without_timms_group_matcher_is_grouped_by_its_modules():
    model = create_model("poolformerv2_s12", num_classes=2)
    assert not hasattr(model.backbone, "group_matcher")
    blocks = model.blocks()
    params = [id(p) for block in blocks for p in block.parameters]
    assert len(params) == len(set(params)) == len(list(model.backbone.parameters()))
    assert [block.name for block in blocks] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3 + head"]
    apply_strategy(model, "last_n", last_n=1)
    assert {n for n, p in model.backbone.named_parameters() if p.requires_grad} == {
        n for n, _ in model.backbone.named_parameters() if n.startswith(("stages.3.", "head."))
    }


def test_a_backbone_without_a_spatial_map_is_refused():
    with pytest.raises(ConfigError, match="pit_ti_224: its last features form a 1-cell map"):
        create_model("pit_ti_224", num_classes=2)


@pytest.fixture
def hub_weights_without_download(monkeypatch):
    """timm builds hub models with the tag's pretrained_cfg but loads no weights, so nothing is fetched."""
    monkeypatch.setattr(weights_module, "hub_reachable", lambda: True)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *args, **kwargs: None)


@pytest.mark.parametrize(
    ("name", "hub", "mean", "side"),
    [
        ("efficientnet_b0", "timm/efficientnet_b0.ra4_e3600_r224_in1k", 0.5, 224),
        ("resnet18", "timm/resnet18.a3_in1k", 0.449, 160),
        ("resnet18", True, 0.449, 224),
    ],
)
def test_hub_weights_bring_their_preprocessing(hub_weights_without_download, name, hub, mean, side):
    model = create_model(name, num_classes=2, pretrained=hub)
    assert model.mean == pytest.approx((mean,), abs=1e-3) and model.input_size == (1, side, side)
    assert model.preprocessing.source == "hub"
    expected = hub if isinstance(hub, str) else f"timm/{name}.{timm.models.get_pretrained_cfg(name).tag}"
    assert model.weights_info == {"source": expected, "format": "hub", "sha256": None}


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_every_model_answers_the_same_questions(name, in_chans):
    model = built(name, in_chans).eval()
    x = torch.randn(1, in_chans, SIDE, SIDE)
    assert model(x).shape == (1, 3)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.num_features)
    assert model.input_size[0] == model.in_chans == in_chans
    assert len(model.mean) == len(model.std) == in_chans
    assert all(s > 0 for s in model.std)


@pytest.mark.parametrize("name", list_models())
def test_cam_layer_gives_a_map_and_gradients(name):
    model = built(name).eval()
    assert any(module is model.cam_layer for module in model.modules())
    assert not [m for m in model.modules() if getattr(m, "inplace", False) is True], "in-place ops break CAM hooks"
    seen = {}
    hooks = [
        model.cam_layer.register_forward_hook(lambda m, i, out: seen.update(activation=out)),
        model.cam_layer.register_full_backward_hook(lambda m, gi, go: seen.update(gradient=go[0])),
    ]
    try:
        model(torch.randn(1, 1, SIDE, SIDE))[0, 0].backward()
    finally:
        for hook in hooks:
            hook.remove()
    activation = seen["activation"] if model.cam_reshape is None else model.cam_reshape(seen["activation"])
    assert activation.ndim == 4 and activation.shape[:2] == (1, model.num_features)
    assert activation.shape[2] * activation.shape[3] > 1
    assert seen["gradient"].shape == seen["activation"].shape
    model.zero_grad()


@pytest.mark.parametrize("name", list_models())
def test_blocks_partition_the_backbone(name):
    blocks = built(name).blocks()
    params = [id(p) for block in blocks for p in block.parameters]
    assert len(params) == len(set(params)) == len(list(built(name).backbone.parameters()))
    assert all(block.name for block in blocks)


@pytest.mark.parametrize("name", list_models())
def test_strategies_choose_what_trains(name):
    model = built(name)
    head = _ids(model.head.parameters())
    blocks = model.blocks()
    assert _trainable(apply_strategy(model, "head")) == head
    assert _trainable(apply_strategy(model, "full")) == _ids(model.parameters())
    last_two = _ids(p for block in blocks[-2:] for p in block.parameters)
    assert _trainable(apply_strategy(model, "last_n", last_n=2)) == head | last_two

    groups = param_groups(model, lr=0.01, backbone_lr_mult=0.1, weight_decay=1e-4)
    lrs = {group["name"]: group["lr"] for group in groups}
    assert lrs["backbone"] == pytest.approx(0.001) and lrs["head"] == pytest.approx(0.01)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == head | last_two


def test_param_groups_hold_only_trainable_parameters():
    model = apply_strategy(built("test_resnet"), "head")
    groups = param_groups(model, lr=0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 0.1)]
    assert _ids(groups[0]["params"]) == _ids(model.head.parameters())


@pytest.mark.parametrize(
    ("strategy", "last_n", "match"),
    [
        ("partial", 0, "head, full, last_n"),
        ("last_n", 0, "between 1 and 5"),
        ("last_n", 9, "between 1 and 5"),
        ("full", 2, "only applies"),
    ],
)
def test_bad_strategies_say_what_is_valid(strategy, last_n, match):
    assert set(STRATEGIES) == {"head", "full", "last_n"}
    with pytest.raises(ConfigError, match=match):
        apply_strategy(built("test_resnet"), strategy, last_n=last_n)


@pytest.mark.parametrize("name", ["test_resnet", "densenet121"])
def test_frozen_batchnorm_stays_in_eval(name):
    model = apply_strategy(built(name), "last_n", last_n=1).train()
    last = _ids(built(name).blocks()[-1].parameters)
    norms = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    frozen = [m for m in norms if not _ids(m.parameters()) & last]
    assert frozen and all(not m.training for m in frozen)
    assert all(m.training for m in norms if _ids(m.parameters()) & last)
    assert model.training and model.head.training

    apply_strategy(model, "head").train()
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(2, 1, SIDE, SIDE))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
    apply_strategy(model, "full").train()
    assert all(m.training for m in norms)


def test_heads_linear_and_mlp():
    mlp = create_model("test_resnet", num_classes=4, head="mlp", head_hidden=(32, 16), head_dropout=0.5)
    kinds = [type(m) for m in mlp.head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert mlp.head[0].in_features == mlp.num_features and mlp.head[-1].out_features == 4
    mlp.reset_head(7)
    assert mlp.eval()(torch.randn(1, 1, SIDE, SIDE)).shape == (1, 7) and mlp.head[0].out_features == 32
    with pytest.raises(ConfigError, match="head: mlp"):
        create_model("test_resnet", num_classes=2, head_hidden=(8,))
    with pytest.raises(ConfigError, match="linear, mlp"):
        create_model("test_resnet", num_classes=2, head="attention")


def _backbone_equal(a: Classifier, b: Classifier, skip: str = "") -> bool:
    other = b.backbone.state_dict()
    return all(torch.equal(v, other[k]) for k, v in a.backbone.state_dict().items() if k != skip)


def test_medlens_safetensors_load_into_a_fresh_model(tmp_path):
    torch.manual_seed(1)
    source = create_model("test_resnet", num_classes=3, in_chans=3)
    save_file(source.state_dict(), tmp_path / "run.safetensors")
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="default is assumed"):
        loaded = create_model("test_resnet", num_classes=3, in_chans=3, pretrained=tmp_path / "run.safetensors")
    assert _backbone_equal(source, loaded)
    assert not torch.equal(source.head.weight, loaded.head.weight), "the head must start fresh"


def test_timm_state_dict_adapts_to_one_channel(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # as a DataParallel run saves it
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "rgb.pt")
    with pytest.warns(UserWarning, match="default is assumed"):
        loaded = create_model("test_resnet", num_classes=2, in_chans=1, pretrained=str(tmp_path / "rgb.pt"))
    stem = "conv1.0.weight"
    adapted = timm.models.adapt_input_conv(1, source.state_dict()[stem])
    assert torch.equal(loaded.backbone.state_dict()[stem], adapted)
    ours = loaded.backbone.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in source.state_dict().items() if k in ours and k != stem)
    assert loaded.head.weight.shape == (2, loaded.num_features)


def test_incomplete_or_extra_weights_are_reported(tmp_path):
    state = built("test_resnet").backbone.state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("layer4.")}, tmp_path / "part.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks .* e\.g\. \['layer4"):
        create_model("test_resnet", num_classes=2, pretrained=tmp_path / "part.safetensors")
    save_file({**state, "aux.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.warns(UserWarning, match="aux.weight"), pytest.warns(UserWarning, match="default is assumed"):
        create_model("test_resnet", num_classes=2, pretrained=tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        create_model("test_resnet", num_classes=2, pretrained=tmp_path / "absent.pth")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        create_model("test_resnet", num_classes=2, pretrained=tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.fixture
def hub_without_network(monkeypatch, tmp_path):
    """A hub that cannot be reached and an empty cache; offline mode reverts after the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


@pytest.mark.parametrize("pretrained", [True, "timm/test_resnet.r160_in1k"])
def test_hub_weights_fail_fast_when_offline(hub_without_network, pretrained):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        create_model("test_resnet", num_classes=2, pretrained=pretrained)
    assert time.monotonic() - start < 2.0
    assert LOCAL_FILE_HINT in str(caught.value)
    assert hub_constants.HF_HUB_OFFLINE, "the hub client must be switched to offline mode"


def test_offline_setting_skips_the_network_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("probed the network although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert not hub_reachable()


def test_hub_names_are_checked(hub_without_network):
    with pytest.raises(ConfigError, match="not test_resnet"):
        create_model("test_resnet", num_classes=2, pretrained="timm/resnet50.a1_in1k")
    with pytest.raises(ConfigError, match="neither a local weights file"):
        create_model("test_resnet", num_classes=2, pretrained="resnet-weights")
