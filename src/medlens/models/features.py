"""Where any timm backbone's last spatial features come out, found by running it once.

timm's convention is that ``forward_features`` returns the unpooled features ``forward_head`` pools. The
module that emits that tensor is the layer a CAM should weigh: ``layer4`` in a ResNet, ``features.norm5``
in a DenseNet, ``bn2`` in an EfficientNet, ``stages.3`` in a ConvNeXt, ``norm`` in a Swin. Where several
nested modules emit the same tensor, the one timm's ``feature_info`` names wins, else the outermost.

Token models (ViT, DeiT, EVA, Mixer) pool a class token or the mean of tokens after a per-token final
norm; a class token's gradient never reaches the patch tokens through that norm, so the CAM layer is the
``norm1`` of the last block whose tokens have the output's shape, as pytorch-grad-cam does for ViTs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medlens.errors import ConfigError

log = logging.getLogger(__name__)

_DERIVED: dict[tuple[str, str], tuple[str, str]] = {}
"""(timm name, its keyword arguments) -> (CAM layer, layout): one probe per architecture and process."""


def derive_cam_layer(
    backbone: nn.Module, timm_name: str, timm_kwargs: Mapping[str, Any], input_size: tuple[int, int, int]
) -> tuple[str, str]:
    """``(cam_layer, layout)`` of ``backbone``: the module emitting its last spatial features, and their layout.

    ``input_size`` is ``(C, H, W)`` of the probe input; models with a fixed input size need their own.
    """
    key = (timm_name, repr(sorted((k, repr(v)) for k, v in timm_kwargs.items())))
    if key not in _DERIVED:
        _DERIVED[key] = _probe(backbone, timm_name, input_size)
        log.debug("%s: CAM layer %s (%s)", timm_name, *_DERIVED[key])
    return _DERIVED[key]


def _probe(backbone: nn.Module, timm_name: str, input_size: tuple[int, int, int]) -> tuple[str, str]:
    emitted: list[tuple[str, nn.Module, Any]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, path=path: emitted.append((path, m, out)))
        for path, module in backbone.named_modules()
        if path
    ]
    x = torch.zeros(1, *input_size, device=next(backbone.parameters()).device)
    training = backbone.training
    try:
        with torch.no_grad():
            features = backbone.eval().forward_features(x)
    except Exception as exc:  # any architecture's own complaint about the input
        raise ConfigError(
            f"{timm_name}: forward_features failed on a {tuple(x.shape)} input ({type(exc).__name__}: {exc}); "
            "set a model.input_size it accepts, or choose another backbone"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(training)

    if not isinstance(features, torch.Tensor) or features.ndim not in (3, 4):
        found = type(features).__name__ if not isinstance(features, torch.Tensor) else f"a {features.ndim}-d tensor"
        raise ConfigError(
            f"{timm_name}: forward_features returns {found}, not one (B, C, H, W), (B, H, W, C) or (B, N, C) "
            "feature tensor, so medlens cannot say which layer a CAM should hook; choose another backbone"
        )
    layout = _layout(features, backbone.num_features)
    if layout is None:
        raise ConfigError(
            f"{timm_name}: forward_features gives {tuple(features.shape)}, and none of its axes has the "
            f"{backbone.num_features} channels timm reports; choose another backbone"
        )
    layer = _token_layer(emitted, features) if layout == "tokens" else None
    layer = layer or _emitter(emitted, features, _last_feature_module(backbone))
    if layer is None:
        raise ConfigError(
            f"{timm_name}: no module emits the tensor forward_features returns (a functional op makes it), so "
            "there is no layer for a CAM to hook; register a BackboneSpec naming cam_layer and layout"
        )
    if _cells(features, layout, backbone) <= 1:
        raise ConfigError(
            f"{timm_name}: its last features form a {_cells(features, layout, backbone)}-cell map at "
            f"{input_size[1]}x{input_size[2]} px, too coarse for a CAM; choose another backbone"
        )
    return layer, layout


def _layout(features: torch.Tensor, channels: int) -> str | None:
    if features.ndim == 3:
        return "tokens" if features.shape[-1] == channels else None
    if features.shape[1] == channels:
        return "nchw"
    return "nhwc" if features.shape[-1] == channels else None


def _emitter(emitted: list[tuple[str, nn.Module, Any]], features: torch.Tensor, named: str | None) -> str | None:
    """The module whose output is ``features`` itself: ``named`` if it is one of them, else the last to finish."""
    paths = [path for path, module, out in emitted if out is features and not isinstance(module, nn.Identity)]
    if named in paths:
        return named
    return paths[-1] if paths else None


def _token_layer(emitted: list[tuple[str, nn.Module, Any]], features: torch.Tensor) -> str | None:
    norms = [
        path
        for path, _, out in emitted
        if path.rsplit(".", 1)[-1] == "norm1" and isinstance(out, torch.Tensor) and out.shape == features.shape
    ]
    return norms[-1] if norms else None


def _last_feature_module(backbone: nn.Module) -> str | None:
    info = getattr(backbone, "feature_info", None)
    info = getattr(info, "info", info)  # a FeatureInfo object on models built for features_only
    return info[-1].get("module") if info else None


def _cells(features: torch.Tensor, layout: str, backbone: nn.Module) -> int:
    if layout == "nchw":
        return features.shape[2] * features.shape[3]
    if layout == "nhwc":
        return features.shape[1] * features.shape[2]
    return features.shape[1] - prefix_tokens(backbone, features.shape[1])


def prefix_tokens(backbone: nn.Module, tokens: int) -> int:
    """Class, distillation and register tokens ahead of the patches: timm's count, else what a square leaves."""
    count = getattr(backbone, "num_prefix_tokens", None)
    return tokens - math.isqrt(tokens) ** 2 if count is None else int(count)


def token_grid(backbone: nn.Module, patches: int, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) patch grid ``patches`` tokens form for an input of ``input_hw``."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if hasattr(patch_embed, "dynamic_feat_size"):
        h, w = patch_embed.dynamic_feat_size(input_hw)  # a token count alone cannot tell a non-square grid
        if h * w == patches:
            return h, w
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens form no square grid, and the model does not say its own")
    return side, side
