"""Classifiers over any timm backbone, found by name; heads, freeze strategies, pretrained weights and their
preprocessing (timm's hub, local files with sidecars, torchxrayvision's)."""

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
