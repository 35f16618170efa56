"""Classifiers over any timm backbone, found by name; heads, freeze strategies, pretrained weights and their
preprocessing (timm's hub, local files with sidecars, torchxrayvision's).

The names below load on first use, so that ``medlens.models.registry`` and ``medlens.models.sources`` (names
and weights sources checked without torch) can be imported without the model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medlens.models.classifier import HEADS, Block, Classifier, create_model, make_head
    from medlens.models.preprocessing import Preprocessing
    from medlens.models.registry import (
        BackboneSpec,
        describe_models,
        get_backbone_spec,
        list_models,
        register_backbone,
    )
    from medlens.models.strategies import STRATEGIES, apply_strategy, param_groups
    from medlens.models.weights import WeightsUnavailableError, load_backbone_weights, read_state_dict

_HOMES = {
    "medlens.models.classifier": ("HEADS", "Block", "Classifier", "create_model", "make_head"),
    "medlens.models.preprocessing": ("Preprocessing",),
    "medlens.models.registry": (
        "BackboneSpec", "describe_models", "get_backbone_spec", "list_models", "register_backbone",
    ),
    "medlens.models.strategies": ("STRATEGIES", "apply_strategy", "param_groups"),
    "medlens.models.weights": ("WeightsUnavailableError", "load_backbone_weights", "read_state_dict"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [
    "HEADS",
    "STRATEGIES",
    "BackboneSpec",
    "Block",
    "Classifier",
    "Preprocessing",
    "WeightsUnavailableError",
    "apply_strategy",
    "create_model",
    "describe_models",
    "get_backbone_spec",
    "list_models",
    "load_backbone_weights",
    "make_head",
    "param_groups",
    "read_state_dict",
    "register_backbone",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'medlens.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
