import math

import pytest
import torch

from reid_ray.losses import CrossEntropyLabelSmooth, TripletLoss


def test_label_smoothed_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    # p = softmax = [e^2, 1, 1] / (e^2 + 2); q = [1 - ε + ε/3, ε/3, ε/3] with ε = 0.1
    z = math.exp(2) + 2
    logp = [2 - math.log(z), -math.log(z), -math.log(z)]
    q = [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]
    expected = -sum(a * b for a, b in zip(q, logp))
    assert CrossEntropyLabelSmooth(0.1)(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_zero_is_plain_cross_entropy():
    logits, y = torch.randn(5, 7), torch.randint(0, 7, (5,))
    assert CrossEntropyLabelSmooth(0.0)(logits, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_batch_hard_triplet_hand_computed():
    # 1-D points: ids 0 at 0 and 1; ids 1 at 3 and 5
    feats = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # hardest positive / negative per anchor: (1, 3), (1, 2), (2, 2), (2, 4)
    hinge = [max(0, 1 - 3 + 0.3), max(0, 1 - 2 + 0.3), max(0, 2 - 2 + 0.3), max(0, 2 - 4 + 0.3)]
    assert TripletLoss(0.3)(feats, labels).item() == pytest.approx(sum(hinge) / 4, abs=1e-5)
    soft = [math.log1p(math.exp(p - n)) for p, n in [(1, 3), (1, 2), (2, 2), (2, 4)]]
    assert TripletLoss(soft_margin=True)(feats, labels).item() == pytest.approx(sum(soft) / 4, abs=1e-5)


def test_triplet_gradient_is_finite_with_duplicate_points():
    feats = torch.zeros(4, 3, requires_grad=True)
    TripletLoss(0.3)(feats, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(feats.grad).all()
