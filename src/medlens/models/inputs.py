"""What goes into a model and what comes out: normalised input batches, probabilities, memory format.

Training, inference and export share these, so a model sees the same input, and its logits mean the same
probabilities, everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_input(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, C) -> normalised float (B, C, H, W), on the device ``images`` are on."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def probabilities(logits: torch.Tensor, task: str, temperature: float = 1.0) -> torch.Tensor:
    """Logits -> probabilities: independent sigmoids (multi-label) or a softmax (multi-class)."""
    scaled = logits / temperature
    return torch.sigmoid(scaled) if task == "multilabel" else torch.softmax(scaled, dim=1)


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """channels_last memory format for convolutional models (a no-op for token models)."""
    if any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        return module.to(memory_format=torch.channels_last)
    return module
