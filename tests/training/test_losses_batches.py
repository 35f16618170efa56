"""Losses (weighted, NaN-masked BCE; CE) and the batch pipeline (order, shards, augmentation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medlens.models.inputs import probabilities, to_input
from medlens.training.batches import augment, epoch_order, shard
from medlens.training.losses import MaskedWeightedBCE, make_loss


def test_bce_masks_unknown_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    loss = MaskedWeightedBCE()(logits, target)
    known = torch.tensor([[2.0, 0.5, 3.0], [1.0, 0.0, 1.0]])
    expected = F.binary_cross_entropy_with_logits(known[0], known[1])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_seed_frequency_weighting():
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 1]], dtype=np.float32)  # label 0: 1 of 4 positive
    loss_fn = make_loss("multilabel", labels, pos_weighting=True, use_class_weights=False, label_smoothing=0)
    # Positives weigh by the negative frequency (x2 so a balanced label keeps weight 1).
    np.testing.assert_allclose(loss_fn.pos_weight.numpy(), [1.5, 1.5])
    np.testing.assert_allclose(loss_fn.neg_weight.numpy(), [0.5, 0.5])
    logits = torch.zeros(1, 2)
    pos_only = loss_fn(logits, torch.tensor([[1.0, float("nan")]]))
    neg_only = loss_fn(logits, torch.tensor([[0.0, float("nan")]]))
    assert pos_only.item() == pytest.approx(3 * neg_only.item())


def test_cross_entropy_with_class_weights_and_smoothing():
    labels = np.eye(3, dtype=np.float32)[[0, 0, 0, 1, 2, 2]]
    loss_fn = make_loss("multiclass", labels, pos_weighting=True, use_class_weights=True, label_smoothing=0.1)
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(logits, torch.tensor([0, 0, 0, 1, 2, 2]), weight=loss_fn.weight, label_smoothing=0.1)
    assert loss_fn(logits, torch.from_numpy(labels)).item() == pytest.approx(expected.item())
    assert loss_fn.weight[1] > loss_fn.weight[0]


def test_probabilities_per_task():
    logits = torch.tensor([[0.0, 2.0]])
    np.testing.assert_allclose(probabilities(logits, "multilabel").numpy(), torch.sigmoid(logits).numpy())
    assert probabilities(logits, "multiclass").sum().item() == pytest.approx(1.0)
    assert probabilities(logits, "multiclass", temperature=100.0)[0, 1] < probabilities(logits, "multiclass")[0, 1]


def test_epoch_order_is_seeded_and_shards_cover_everything():
    a, b = epoch_order(10, seed=1, epoch=2), epoch_order(10, seed=1, epoch=2)
    assert np.array_equal(a, b) and not np.array_equal(a, epoch_order(10, seed=1, epoch=3))
    parts = [shard(a, r, 3) for r in range(3)]  # validation's padded, interleaved shares
    assert {len(p) for p in parts} == {4}
    assert set(np.concatenate(parts)) == set(range(10))


def test_to_input_normalises():
    images = np.full((2, 4, 4), 255, dtype=np.uint8)
    x = to_input(images, [0.5], [0.25])
    assert x.shape == (2, 1, 4, 4) and torch.allclose(x, torch.full_like(x, 2.0))
    rgb = to_input(np.zeros((1, 4, 4, 3), dtype=np.uint8), [0, 0, 0], [1, 1, 1])
    assert rgb.shape == (1, 3, 4, 4)


def test_augment_is_deterministic_and_small():
    x = torch.rand(4, 1, 32, 32)
    one = augment(x, "xray", 1.0, torch.Generator().manual_seed(0))
    two = augment(x, "xray", 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(one, two) and one.shape == x.shape
    assert 0 < (one - x).abs().mean() < 0.5
    assert torch.equal(augment(x, "none", 1.0, torch.Generator()), x)
    with pytest.raises(ValueError, match="xray, face, none"):
        augment(x, "mirror", 1.0, torch.Generator())
