"""One classifier over any registered timm backbone, answering the same questions for every architecture.

A :class:`Classifier` is a timm backbone built with ``num_classes=0`` (its global pooling kept) and a
medlens head. Freezing, Grad-CAM, training and serving ask it for ``cam_layer``, ``cam_reshape``,
``input_size``, ``mean``/``std``, ``num_features`` and ``blocks()`` and never look at the architecture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models._manipulate import MATCH_PREV_GROUP, group_with_matcher
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medlens.errors import ConfigError
from medlens.models.registry import BackboneSpec, get_backbone_spec
from medlens.models.weights import create_from_hub, is_weights_file, load_backbone_weights

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
    """A timm backbone (pooled features) followed by a medlens head; ``forward(x)`` returns logits."""

    def __init__(
        self,
        spec: BackboneSpec,
        backbone: nn.Module,
        num_classes: int,
        head: str = "linear",
        head_hidden: Sequence[int] = (),
        head_dropout: float = 0.0,
    ):
        super().__init__()
        _make_cam_safe(backbone)
        self.spec = spec
        self.name = spec.name
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.head_kind = head
        self.head_hidden = tuple(int(size) for size in head_hidden)
        self.head_dropout = float(head_dropout)
        self.head = make_head(head, self.num_features, num_classes, self.head_hidden, self.head_dropout)
        self.num_classes = num_classes

        cfg = backbone.pretrained_cfg
        in_chans = backbone.get_submodule(cfg["first_conv"]).in_channels
        side = spec.image_size
        self.input_size: tuple[int, int, int] = (in_chans, *((side, side) if side else cfg["input_size"][1:]))
        self.mean: tuple[float, ...] = _channel_stats(cfg["mean"], in_chans)
        self.std: tuple[float, ...] = _channel_stats(cfg["std"], in_chans)
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
        """Turns ``cam_layer`` tokens ``(B, prefix + H*W, C)`` into ``(B, C, H, W)``; ``None`` for CNNs."""
        return self._tokens_to_map if self.spec.tokens else None

    def _tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.backbone.patch_embed.dynamic_feat_size(self._input_hw or self.input_size[1:])
        patches = tokens[:, self.backbone.num_prefix_tokens :]
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled backbone features: ``(B, C, H, W)`` maps, or ``(B, tokens, C)`` for a ViT."""
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
        parameter is in exactly one block.
        """
        matcher = self.backbone.group_matcher(coarse=False)
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
) -> Classifier:
    """A :class:`Classifier` over the registered backbone ``name`` (see :func:`list_models`).

    ``pretrained`` is ``False``; ``True`` (timm's default hub weights) or a hub name such as
    ``"timm/resnet50.a1_in1k"``, both needing a network; or a local ``.safetensors``/``.pt``/``.pth``/``.bin``
    file, whose classifier is dropped and whose 3-channel stem is adapted to ``in_chans``.
    """
    spec = get_backbone_spec(name)
    if in_chans < 1:
        raise ConfigError(f"in_chans must be at least 1, got {in_chans}")
    timm_kwargs = {**spec.timm_kwargs, "num_classes": 0, "in_chans": in_chans, "drop_rate": drop_rate}
    if pretrained is True or (isinstance(pretrained, str) and not is_weights_file(pretrained)):
        backbone = create_from_hub(spec.timm_name, None if pretrained is True else pretrained, **timm_kwargs)
    else:
        backbone = timm.create_model(spec.timm_name, pretrained=False, **timm_kwargs)
        if pretrained:
            load_backbone_weights(backbone, pretrained)
    return Classifier(spec, backbone, num_classes, head, head_hidden, head_dropout)


def _make_cam_safe(backbone: nn.Module) -> None:
    """In-place activations overwrite the tensors CAM hooks keep (DenseNet's ReLUs break backward hooks)."""
    for module in backbone.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False


def _channel_stats(stats: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """RGB normalisation for ``in_chans``: as is for 3 channels, else their mean on every channel."""
    if len(stats) == in_chans:
        return tuple(float(s) for s in stats)
    return (sum(stats) / len(stats),) * in_chans


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
