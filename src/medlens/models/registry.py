"""The backbones medlens knows by name, and what each needs beyond timm's defaults.

Configs and the CLI say ``densenet121``, never an import path. Each entry names the timm architecture,
the module a CAM should hook, whether that module emits tokens (ViT) instead of a feature map, and any
timm keyword it needs. Everything else (input size, normalisation, classifier name, first conv, the
block grouping ``last_n`` counts) is read from timm's own model, so it cannot drift from the weights.

How many blocks ``last_n`` can count for each backbone (the stem first, the last block carrying the
final norm; see :meth:`medlens.models.Classifier.blocks`)::

    resnet50 17, resnetv2_50 17, densenet121 59, efficientnet_b0 17, convnext_tiny 19,
    vit_small_patch16_224 13, resnet18 9, tiny 5, test_* 5-10
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medlens.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    """What medlens needs to know about one backbone that timm does not say itself."""

    name: str
    timm_name: str
    cam_layer: str
    """Dotted path, inside the timm model, of the module whose output a CAM should weigh."""
    summary: str
    tokens: bool = False
    """``cam_layer`` emits ``(B, prefix + H*W, C)`` tokens, which ``Classifier.cam_reshape`` maps."""
    image_size: int | None = None
    """Default input side; ``None`` takes timm's pretrained input size."""
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Make ``spec`` available to :func:`medlens.models.create_model` under ``spec.name``."""
    if spec.name in _REGISTRY:
        raise ConfigError(f"a backbone called {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """The names :func:`medlens.models.create_model` accepts, sorted."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model name {name!r}; choose one of {', '.join(list_models())}") from None


# ViTs accept any input side a multiple of the patch (position embeddings are interpolated), so a model
# trained at 128 px needs no img_size of its own and checkpoints keep timm's 224 px shapes.
_VIT = {"dynamic_img_size": True}

for _spec in (
    BackboneSpec("resnet50", "resnet50", "layer4", "ResNet-50, the default X-ray backbone"),
    BackboneSpec("resnetv2_50", "resnetv2_50", "norm", "pre-activation ResNet-50 (BiT family)"),
    BackboneSpec("densenet121", "densenet121", "features.norm5", "DenseNet-121, as in CheXNet"),
    BackboneSpec("efficientnet_b0", "efficientnet_b0", "bn2", "EfficientNet-B0, small and strong"),
    BackboneSpec("convnext_tiny", "convnext_tiny", "stages.3", "ConvNeXt-T"),
    BackboneSpec(
        "vit_small_patch16_224", "vit_small_patch16_224", "blocks.11.norm1", "ViT-S/16",
        tokens=True, timm_kwargs=_VIT,
    ),
    BackboneSpec("resnet18", "resnet18", "layer4", "ResNet-18, a quick baseline"),
    # Output stride 16 (a dilated last stage) gives an 8x8 CAM grid at 128 px instead of 4x4: the demo's
    # heatmaps must be able to point inside a nodule-sized box.
    BackboneSpec(
        "tiny", "resnet10t", "layer4", "ResNet-10-T at 128 px with output stride 16, the demo's CPU CNN",
        image_size=128, timm_kwargs={"output_stride": 16},
    ),
    BackboneSpec("test_resnet", "test_resnet", "layer4", "timm's test ResNet, for tests", image_size=64),
    BackboneSpec("test_efficientnet", "test_efficientnet", "bn2", "timm's test EfficientNet", image_size=64),
    BackboneSpec("test_convnext", "test_convnext", "stages.3", "timm's test ConvNeXt", image_size=64),
    BackboneSpec(
        "test_vit", "test_vit", "blocks.5.norm1", "timm's test ViT", tokens=True, image_size=64,
        timm_kwargs=_VIT,
    ),
):
    register_backbone(_spec)
