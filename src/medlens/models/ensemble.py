"""Fold ensembles: K members of one architecture whose probabilities are averaged, saved as one checkpoint.

An :class:`Ensemble` returns the logits of its members' mean probability (each member's logits divided by
its own temperature first): multi-label ``logit(mean_i sigmoid(z_i / T_i))``, multi-class
``log(mean_i softmax(z_i / T_i))``. So the usual ``probabilities(logits, task, 1.0)`` of a loaded model gives
exactly the averaged probabilities, and evaluate, predict, explain and serve take it like any checkpoint.
For CAMs it names every member's CAM layer: pytorch-grad-cam then averages the members' normalised maps.

The checkpoint folder holds all members' weights in one ``model.safetensors`` (it needs nothing else) and a
manifest with ``"kind": "ensemble"``, the members' shared model spec and preprocessing, and per member its
source checkpoint (relative path), temperature, epoch and validation metrics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens.errors import CheckpointError
from medlens.models.checkpoint import load_weights, read_manifest, resolve_checkpoint, save_checkpoint

ENSEMBLE_KIND = "ensemble"
SHARED_KEYS = ("task", "labels", "model", "preprocessing", "data", "config")
"""What every member's manifest must agree on (except ``config``, taken from the first member)."""


class Ensemble(nn.Module):
    """Members of one architecture; ``forward(x)`` returns the logits of their mean probability."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float], task: str):
        super().__init__()
        if not members or len(members) != len(temperatures):
            raise ValueError(
                f"an ensemble needs members and one temperature each, got {len(members)} and {len(temperatures)}"
            )
        self.members = nn.ModuleList(members)
        self.register_buffer("temperatures", torch.tensor(list(temperatures)).view(-1, 1, 1), persistent=False)
        self.task = task
        first = members[0]
        self.num_classes: int = first.num_classes
        self.input_size = first.input_size
        self.mean, self.std = first.mean, first.std

    @property
    def cam_layers(self) -> list[nn.Module]:
        """Each member's CAM layer: a CAM over all of them averages the members' maps."""
        return [member.cam_layer for member in self.members]

    @property
    def cam_reshape(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.members[0].cam_reshape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([member(x).float() for member in self.members]) / self.temperatures
        if self.task == "multiclass":
            return torch.logsumexp(torch.log_softmax(z, dim=-1), dim=0) - math.log(len(self.members))
        # logit(mean p) = log(sum p_i) - log(sum (1 - p_i)), each sum taken in log space: finite for any z.
        return torch.logsumexp(nn.functional.logsigmoid(z), dim=0) - torch.logsumexp(
            nn.functional.logsigmoid(-z), dim=0
        )


def is_ensemble(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("kind") == ENSEMBLE_KIND


def model_from_manifest(manifest: Mapping[str, Any]) -> nn.Module:
    """The untrained model a checkpoint's manifest describes: one classifier, or an :class:`Ensemble` of them."""
    if not is_ensemble(manifest):
        return _classifier(manifest["model"])
    members = manifest["members"]
    temperatures = [float(m.get("temperature", 1.0)) for m in members]
    return Ensemble([_classifier(manifest["model"]) for _ in members], temperatures, manifest["task"])


def _classifier(spec: Mapping[str, Any]) -> nn.Module:
    from medlens.models import create_model

    return create_model(
        spec["name"],
        num_classes=int(spec["num_classes"]),
        in_chans=int(spec["in_chans"]),
        pretrained=False,
        head=spec.get("head", "linear"),
        head_hidden=spec.get("head_hidden", []),
        head_dropout=float(spec.get("head_dropout", 0.0)),
    )


def save_ensemble(
    folder: str | Path,
    member_checkpoints: Sequence[str | Path],
    thresholds: Sequence[float],
    metrics: Mapping[str, Any],
    **fields: Any,
) -> Path:
    """Write the ensemble of ``member_checkpoints`` to ``folder``; returns the folder.

    ``thresholds`` and ``metrics`` describe the ensemble (chosen on pooled out-of-fold predictions);
    ``fields`` are added to the manifest as they are.
    """
    folder = Path(folder)
    paths = [resolve_checkpoint(p) for p in member_checkpoints]
    manifests = [read_manifest(p) for p in paths]
    first = manifests[0]
    for path, manifest in zip(paths[1:], manifests[1:], strict=True):
        differs = [key for key in SHARED_KEYS[:-1] if manifest.get(key) != first.get(key)]
        if differs:
            raise CheckpointError(f"{path} differs from {paths[0]} in {differs}: members must share them")
    members = [
        {
            "path": os.path.relpath(path, folder),
            "temperature": float(m.get("temperature", 1.0)),
            "epoch": m.get("epoch"),
            "metrics": m.get("metrics", {}),
        }
        for path, m in zip(paths, manifests, strict=True)
    ]
    manifest = {
        **{key: first[key] for key in SHARED_KEYS if key in first},
        "kind": ENSEMBLE_KIND,
        "members": members,
        "thresholds": [float(t) for t in thresholds],
        "temperature": 1.0,
        "metrics": dict(metrics),
        **fields,
    }
    ensemble = model_from_manifest(manifest)
    for member, path in zip(ensemble.members, paths, strict=True):
        member.load_state_dict(load_weights(path))
    return save_checkpoint(folder, ensemble, manifest)
