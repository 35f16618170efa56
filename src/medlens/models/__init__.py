"""Classifiers over timm backbones, found by name; heads, freeze strategies and pretrained weights."""

from medlens.models.classifier import HEADS, Block, Classifier, create_model, make_head
from medlens.models.registry import BackboneSpec, get_backbone_spec, list_models, register_backbone
from medlens.models.strategies import STRATEGIES, apply_strategy, param_groups
from medlens.models.weights import WeightsUnavailableError, load_backbone_weights, read_state_dict

__all__ = [
    "HEADS",
    "STRATEGIES",
    "BackboneSpec",
    "Block",
    "Classifier",
    "WeightsUnavailableError",
    "apply_strategy",
    "create_model",
    "get_backbone_spec",
    "list_models",
    "load_backbone_weights",
    "make_head",
    "param_groups",
    "read_state_dict",
    "register_backbone",
]
