"""One classifier over any timm backbone, answering the same questions for every architecture.

A :class:`Classifier` is a timm backbone built with ``num_classes=0`` (its global pooling kept) and a
medlens head. Freezing, Grad-CAM, training and serving ask it for ``cam_layer``, ``cam_reshape``,
``input_size``, ``mean``/``std`` (and the whole ``preprocessing``), ``num_features``, ``blocks()`` and
``weights_info`` and never look at the architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._manipulate import MATCH_PREV_GROUP, group_with_matcher
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medlens.errors import CheckpointError, ConfigError
from medlens.models.features import derive_cam_layer, prefix_tokens, token_grid
from medlens.models.preprocessing import Preprocessing, from_pretrained_cfg, sidecar_path
from medlens.models.registry import BackboneSpec, get_backbone_spec
from medlens.models.sources import is_weights_file
from medlens.models.weights import (
    LocalWeights,
    create_from_hub,
    hub_weights_info,
    load_state,
    read_local_weights,
)

log = logging.getLogger(__name__)

HEADS = ("linear", "mlp")


@dataclass(eq=False)
class Block:
    """One unit that ``last_n`` counts, named by the backbone modules (or bare parameters) it holds."""

    name: str
    parameters: list[nn.Parameter]

    def requires_grad_(self, requires_grad: bool) -> None:
        for param in self.parameters:
            param.requires_grad_(requires_grad)


def make_head(
    kind: str, num_features: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.0
) -> nn.Module:
    """``linear``: one layer. ``mlp``: Linear layers of sizes ``hidden`` with ReLU and dropout between."""
    if kind not in HEADS:
        raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"head_dropout must be in [0, 1), got {dropout}")
    if kind == "linear":
        if hidden or dropout:
            raise ConfigError(
                "head_hidden and head_dropout shape an mlp head: set head: mlp, or use drop_rate for dropout "
                f"before a linear head (got head_hidden={list(hidden)}, head_dropout={dropout})"
            )
        return nn.Linear(num_features, num_classes)
    if not hidden or any(int(size) < 1 for size in hidden):
        raise ConfigError(
            f"head: mlp needs positive hidden sizes in head_hidden, e.g. [512, 256]; got {list(hidden)}"
        )
    layers: list[nn.Module] = []
    width = num_features
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU(), nn.Dropout(dropout)]
        width = int(size)
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class Classifier(nn.Module):
    """A timm backbone (pooled features) followed by a medlens head; ``forward(x)`` returns logits.

    ``preprocessing`` defaults to what the backbone's ``pretrained_cfg`` says; ``weights_info`` records
    where the backbone's weights came from (``None``: freshly initialised). ``spec`` may leave the CAM
    layer to be derived from the backbone (:mod:`medlens.models.features`).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        backbone: nn.Module,
        num_classes: int,
        head: str = "linear",
        head_hidden: Sequence[int] = (),
        head_dropout: float = 0.0,
        preprocessing: Preprocessing | None = None,
        weights_info: Mapping[str, str | None] | None = None,
    ):
        super().__init__()
        _make_cam_safe(backbone)
        cfg = backbone.pretrained_cfg
        in_chans = backbone.get_submodule(cfg["first_conv"]).in_channels
        self.preprocessing = preprocessing or from_pretrained_cfg(cfg, in_chans, spec.image_size, "architecture")
        self.input_size: tuple[int, int, int] = (in_chans, *self.preprocessing.input_size)
        self.mean: tuple[float, ...] = self.preprocessing.mean
        self.std: tuple[float, ...] = self.preprocessing.std
        self.weights_info = dict(weights_info) if weights_info is not None else None
        if spec.cam_layer is None:
            layer, layout = derive_cam_layer(backbone, spec.timm_name, spec.timm_kwargs, self.input_size)
            spec = dataclasses.replace(spec, cam_layer=layer, layout=layout)
        self.spec = spec
        self.name = spec.name
        self.backbone = backbone
        # What forward_head returns: some heads widen the pooled features first (MobileNetV3's conv_head).
        self.num_features: int = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.head_kind = head
        self.head_hidden = tuple(int(size) for size in head_hidden)
        self.head_dropout = float(head_dropout)
        self.head = make_head(head, self.num_features, num_classes, self.head_hidden, self.head_dropout)
        self.num_classes = num_classes
        self._input_hw: tuple[int, int] | None = None

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output a CAM should weigh: the last spatial features (ViT: last block's norm1)."""
        return self.backbone.get_submodule(self.spec.cam_layer)

    @property
    def cam_layers(self) -> list[nn.Module]:
        """The layers a CAM hooks: this model's one (a fold ensemble names one per member)."""
        return [self.cam_layer]

    @property
    def cam_reshape(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Turns ``cam_layer``'s tokens or channels-last map into ``(B, C, H, W)``; ``None`` when it is one."""
        return {"nchw": None, "nhwc": _channels_first, "tokens": self._tokens_to_map}[self.spec.layout]

    def _tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        prefix = prefix_tokens(self.backbone, tokens.shape[1])
        h, w = token_grid(self.backbone, tokens.shape[1] - prefix, self._input_hw or self.input_size[1:])
        return tokens[:, prefix:].reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled backbone features: ``(B, C, H, W)`` maps, ``(B, H, W, C)`` (Swin) or ``(B, tokens, C)`` (ViT)."""
        self._input_hw = (x.shape[-2], x.shape[-1])  # a token count alone cannot tell a non-square grid
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``features``; return the ``(B, num_features)`` embedding if ``pre_logits``, else logits."""
        pooled = self.backbone.forward_head(features)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_head(self, num_classes: int) -> None:
        """A fresh head of the same kind for ``num_classes`` outputs."""
        self.head = make_head(
            self.head_kind, self.num_features, num_classes, self.head_hidden, self.head_dropout
        )
        self.num_classes = num_classes

    def blocks(self) -> list[Block]:
        """The backbone's units from stem to last, as timm groups them for layer-wise learning rates.

        The stem, then each residual block / dense layer (with its transition) / transformer block / stage
        block. Parameters after the last block (a final norm, EfficientNet's ``conv_head``) belong to the last
        one, so ``last_n=1`` trains the last unit together with what normalises its output. Every backbone
        parameter is in exactly one block. A backbone without timm's ``group_matcher`` (MetaFormer, PiT) is
        grouped by its top-level modules, each stage of a stage list counting as one block.
        """
        has_matcher = hasattr(self.backbone, "group_matcher")
        matcher = self.backbone.group_matcher(coarse=False) if has_matcher else _module_matcher(self.backbone)
        if isinstance(matcher, dict):
            matcher = {**matcher, "after_last_block": [(r".", MATCH_PREV_GROUP)]}
        params = dict(self.backbone.named_parameters())
        groups = group_with_matcher(params.items(), matcher)
        modules = [(path, set(_param_names(path, module))) for path, module in self.backbone.named_modules()]
        return [Block(_block_name(names, modules), [params[n] for n in names]) for names in groups.values()]

    def train(self, mode: bool = True) -> Classifier:
        """Also keeps BatchNorm layers whose weights are frozen in eval mode, so their statistics stay put."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                own = list(module.parameters(recurse=False))
                if isinstance(module, _BatchNorm) and own and not any(p.requires_grad for p in own):
                    module.eval()
        return self


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained: bool | str | Path = False,
    head: str = "linear",
    head_hidden: Sequence[int] = (),
    head_dropout: float = 0.0,
    drop_rate: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | None = None,
) -> Classifier:
    """A :class:`Classifier` over the backbone ``name``: a registered one (:func:`list_models`) or any timm model.

    ``pretrained`` is ``False``; ``True`` (timm's default hub weights) or a hub name such as
    ``"timm/resnet50.a1_in1k"``, both needing a network; a local ``.safetensors``/``.pt``/``.pth``/``.bin``
    file, whose classifier is dropped and whose stem is adapted to ``in_chans``; or torchxrayvision's
    weights, ``"xrv:densenet121-res224-all"`` or ``"xrv:/path/to/file.pt"``. The preprocessing the weights
    expect comes with them (hub config, torchxrayvision's conventions, a ``<file>.json`` sidecar);
    ``mean``, ``std`` (per channel, or one for all) and ``input_size`` (a side in pixels) override it.
    """
    spec = get_backbone_spec(name)
    if in_chans < 1:
        raise ConfigError(f"in_chans must be at least 1, got {in_chans}")
    timm_kwargs = {
        **_input_size_kwargs(spec.timm_name),
        **spec.timm_kwargs,
        "num_classes": 0,
        "in_chans": in_chans,
        "drop_rate": drop_rate,
    }
    local: LocalWeights | None = None
    if pretrained is True or (isinstance(pretrained, str) and not is_weights_file(pretrained)):
        hub = None if pretrained is True else str(pretrained)
        backbone = _build(spec.timm_name, functools.partial(create_from_hub, spec.timm_name, hub), timm_kwargs)
        info: dict[str, str | None] | None = hub_weights_info(backbone, hub)
    else:
        local = read_local_weights(pretrained, spec.timm_name) if pretrained else None
        create = functools.partial(timm.create_model, spec.timm_name, pretrained=False)
        backbone = _build(spec.timm_name, create, timm_kwargs)
        if local is not None:
            load_state(backbone, local.state, local.path)
        info = local.info if local else None
    preprocessing = _weights_preprocessing(backbone, spec, in_chans, info, local)
    explicit = {"mean": mean, "std": std, "input_size": input_size}
    preprocessing = preprocessing.updated("config", in_chans, explicit, ConfigError)
    if local is not None and not _describes_normalisation(local, explicit):
        warnings.warn(
            f"{local.path}: no preprocessing came with these weights, so {spec.timm_name}'s default is assumed "
            f"(mean {list(preprocessing.mean)}, std {list(preprocessing.std)}, {preprocessing.input_size[0]} px). "
            f"If they were trained otherwise, put a JSON sidecar {sidecar_path(local.path)} with mean and std (or "
            "input_scaling) and input_size, or set model.mean, model.std and model.input_size",
            stacklevel=2,
        )
    return Classifier(spec, backbone, num_classes, head, head_hidden, head_dropout, preprocessing, info)


def _input_size_kwargs(timm_name: str) -> dict[str, Any]:
    """Models whose weights fix the input size (ViT, Swin) are asked to interpolate position embeddings.

    A model trained at 128 px then needs no img_size of its own, and checkpoints keep timm's 224 px shapes.
    """
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return {"dynamic_img_size": True} if cfg is not None and cfg.fixed_input_size else {}


def _build(timm_name: str, create: Callable[..., nn.Module], timm_kwargs: Mapping[str, Any]) -> nn.Module:
    """``create(**timm_kwargs)``, again without ``dynamic_img_size`` for a model class that does not take it."""
    try:
        return create(**timm_kwargs)
    except TypeError as exc:
        if "dynamic_img_size" not in timm_kwargs or "dynamic_img_size" not in str(exc):
            raise
    log.info("%s takes no dynamic_img_size: it needs the input size of its weights", timm_name)
    return create(**{k: v for k, v in timm_kwargs.items() if k != "dynamic_img_size"})


def _weights_preprocessing(
    backbone: nn.Module,
    spec: BackboneSpec,
    in_chans: int,
    info: Mapping[str, str | None] | None,
    local: LocalWeights | None,
) -> Preprocessing:
    """timm's config (of the architecture, or of the hub tag fetched), then what the weights file implies."""
    source = "hub" if info is not None and local is None else "architecture"
    preprocessing = from_pretrained_cfg(backbone.pretrained_cfg, in_chans, spec.image_size, source)
    if local is not None:
        preprocessing = preprocessing.updated("torchxrayvision", in_chans, local.implied, CheckpointError)
        preprocessing = preprocessing.updated("sidecar", in_chans, local.sidecar or {}, CheckpointError)
    return preprocessing


def _describes_normalisation(local: LocalWeights, explicit: Mapping[str, Any]) -> bool:
    said = [local.implied, local.sidecar or {}, explicit]
    return any(settings.get(key) is not None for settings in said for key in ("mean", "std", "input_scaling"))


def _make_cam_safe(backbone: nn.Module) -> None:
    """In-place activations overwrite the tensors CAM hooks keep (DenseNet's ReLUs break backward hooks)."""
    for module in backbone.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False


def _channels_first(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 3, 1, 2)


def _module_matcher(backbone: nn.Module) -> Callable[[str], tuple[float, ...]]:
    """A ``group_matcher`` from the module tree, for backbones without timm's.

    The stage lists are the top-level modules holding what ``feature_info`` names (``stages`` for
    ``stages.0``...): each of their entries is one block, and so is every other top-level module; what
    comes before the first list is the stem, what follows the last joins its last entry.
    """
    info = getattr(backbone, "feature_info", None) or []
    listed = {entry["module"].split(".")[0] for entry in getattr(info, "info", info) if "." in entry["module"]}
    children = [(name, child) for name, child in backbone.named_children() if any(True for _ in child.parameters())]
    position = {name: i for i, (name, _) in enumerate(children)}
    entries = {
        i: {name: j for j, (name, _) in enumerate(child.named_children())}
        for i, (name, child) in enumerate(children)
        if name in listed
    }

    def ordinal(param: str) -> tuple[float, ...]:
        top, _, rest = param.partition(".")
        i = position.get(top, 0)  # bare parameters (a class token, position embeddings) go with the stem
        if i in entries:
            return (i, entries[i][rest.split(".")[0]])
        if entries and i < min(entries):
            return (0,)
        if entries and i > max(entries):
            return (max(entries), MATCH_PREV_GROUP[0])
        return (i,)

    return ordinal


def _param_names(path: str, module: nn.Module) -> list[str]:
    return [f"{path}.{name}" if path else name for name, _ in module.named_parameters()]


def _block_name(names: list[str], modules: list[tuple[str, set[str]]]) -> str:
    """The fewest modules whose parameters are exactly ``names``, plus any bare parameters, in model order."""
    position = {name: i for i, name in enumerate(names)}
    covered: set[str] = set()
    parts = []
    for path, owned in modules:
        if owned and owned <= position.keys() and not owned & covered:
            parts.append((min(position[n] for n in owned), path or "backbone"))
            covered |= owned
    parts += [(position[name], name) for name in names if name not in covered]
    return " + ".join(part for _, part in sorted(parts))
