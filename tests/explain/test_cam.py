"""Every registered model through GradCAM, every CAM method through one tiny model: maps, hooks, speed-ups."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medlens.data.transforms import resize_map
from medlens.errors import ConfigError
from medlens.explain.cam import CAM_METHODS, CamExplainer, cam_method, explain
from medlens.models import Classifier, create_model, list_models
from medlens.models.inputs import to_channels_last

SIDE = 64  # a multiple of every stride and of the ViT patch; big backbones stay quick on CPU


@functools.cache
def built(name: str) -> Classifier:
    torch.manual_seed(0)
    return to_channels_last(create_model(name, num_classes=3, in_chans=1).eval())


def _input(seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last)


def _check_map(heatmap: np.ndarray) -> None:
    assert heatmap.shape == (SIDE, SIDE) and heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_a_gradcam_map(name):
    _check_map(explain(built(name), _input(), target=1))


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_gives_the_packages_own_map(method):
    """Cutting the graph at the CAM layer and freezing weights must not change a single value."""
    model = built("test_resnet")
    x = _input()
    with CamExplainer(model, method) as explainer:
        heatmap = explainer(x, 2)
    _check_map(heatmap)
    with CAM_METHODS[method](model, [model.cam_layer], reshape_transform=model.cam_reshape) as reference:
        expected = reference(x, [ClassifierOutputTarget(2)])[0]
    np.testing.assert_allclose(heatmap, expected, atol=1e-5)


def test_vit_tokens_are_reshaped_into_a_map():
    model = built("test_vit")
    assert model.cam_reshape is not None
    with CamExplainer(model, "gradcam") as explainer:
        maps = [explainer(_input(seed), 0) for seed in range(2)]
    for heatmap in maps:
        _check_map(heatmap)
    assert not np.array_equal(*maps), "two different images gave the same map"


def test_the_explainer_keeps_its_hooks_and_leaves_no_gradients():
    model = built("test_resnet")
    layer = model.cam_layer
    before = len(layer._forward_hooks)
    trainable = [p.requires_grad for p in model.parameters()]
    x = _input()
    with CamExplainer(model, "gradcam") as explainer:
        registered = len(layer._forward_hooks)
        for target in (0, 1, 2, 0):
            explainer(x, target)
        assert len(layer._forward_hooks) == registered > before
    assert len(layer._forward_hooks) == before
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert not x.requires_grad and x.grad is None


def test_the_target_decides_the_map():
    model = built("test_resnet")
    with CamExplainer(model, "gradcam") as explainer:
        maps = [explainer(_input(), target) for target in range(3)]
    assert not np.allclose(maps[0], maps[1]) or not np.allclose(maps[1], maps[2])


def test_explain_works_inside_no_grad():
    with torch.no_grad():
        _check_map(explain(built("test_resnet"), _input(), target=0))


def test_bad_method_target_and_batch_say_what_is_valid():
    model = built("test_resnet")
    with pytest.raises(ConfigError, match="gradcam\\+\\+"):
        cam_method("grad-cam")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        explain(model, _input(), target=3)
    with pytest.raises(ValueError, match="one image at a time"):
        explain(model, torch.randn(2, 1, SIDE, SIDE), target=0)


def test_resize_map_stretches_onto_a_non_square_image():
    heatmap = np.zeros((4, 4), dtype=np.float32)
    heatmap[1, 3] = 1.0
    stretched = resize_map(heatmap, (40, 80))
    assert stretched.shape == (40, 80)
    row, col = np.unravel_index(np.argmax(stretched), stretched.shape)
    assert 10 <= row < 20 and 60 <= col < 80
