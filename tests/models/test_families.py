"""Nine architecture families, by timm's own names or as small test models, through what medlens does with any
backbone: one training step with ``last_n``, a Grad-CAM map, and an ONNX graph whose logits match torch's."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from medlens.explain.cam import CamExplainer
from medlens.jobs.export import PARITY_TOLERANCE
from medlens.models import apply_strategy, create_model, list_models, param_groups

SIDE = 64

FAMILIES = {
    # family: (smallest model, layout of its CAM layer)
    "resnet": ("resnet10t", "nchw"),
    "densenet": ("test_densenet", "nchw"),
    "efficientnet": ("test_efficientnet", "nchw"),
    "convnext": ("convnext_atto", "nchw"),
    "regnet": ("regnetx_002", "nchw"),
    "mobilenetv3": ("mobilenetv3_small_050", "nchw"),  # its head widens the pooled features (head_hidden_size)
    "vit": ("vit_tiny_patch16_224", "tokens"),  # fixed 224 px in timm: position embeddings interpolated
    "swin": ("test_swin", "nhwc"),
    "mambaout": ("test_mambaout", "nhwc"),
}


def _batch(n: int) -> torch.Tensor:
    return torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize(("name", "layout"), list(FAMILIES.values()), ids=list(FAMILIES))
def test_family_trains_explains_and_exports(name, layout, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=1)
    assert model.spec.layout == layout and model.cam_layer is model.backbone.get_submodule(model.spec.cam_layer)

    # One training step: the head and the last two blocks move, nothing frozen does.
    apply_strategy(model, "last_n", last_n=2)
    trained = {id(p) for block in model.blocks()[-2:] for p in block.parameters} | {
        id(p) for p in model.head.parameters()
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(param_groups(model, lr=0.5), lr=0.5)
    x = _batch(2)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model.train()(x), torch.eye(2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = {id(p) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trained
    assert moved & {id(p) for p in model.head.parameters()} and moved - {id(p) for p in model.head.parameters()}

    # Grad-CAM maps from the derived layer. Random weights can point every channel of one output away
    # (ReLU leaves all zeros), so the model must show something for one of its two outputs.
    with CamExplainer(model, "gradcam") as explainer:
        heatmaps = [explainer(x[:1], target) for target in (0, 1)]
    for heatmap in heatmaps:
        assert heatmap.shape == (SIDE, SIDE) and np.isfinite(heatmap).all()
        assert 0.0 <= heatmap.min() <= heatmap.max() <= 1.0
    assert any(heatmap.max() > heatmap.min() for heatmap in heatmaps), "every map is constant"

    # The ONNX graph computes the same logits.
    path = tmp_path / "model.onnx"
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, external_data=False, optimize=False, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=PARITY_TOLERANCE, rtol=0)


def test_the_sweep_covers_registered_and_unregistered_names():
    names = [name for name, _ in FAMILIES.values()]
    assert len(FAMILIES) >= 8 and {"nchw", "nhwc", "tokens"} == {layout for _, layout in FAMILIES.values()}
    assert set(names) - set(list_models()), "some family must come by timm's name alone"
