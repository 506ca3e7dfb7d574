import math

import pytest
import torch

from reid_ray.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss
from reid_ray.losses.mmt import SoftmaxTripletLoss


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


# --------------------------------------------------------------------------- BoT's center loss (losses/center.py)

def _three_samples():
    """3 samples, 2 classes, 2 dims: c_0 = (0, 0), c_1 = (1, 1); f = (1, 0), (0, 2) of class 0, (3, 1) of class 1."""
    loss = CenterLoss(2, 2)
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    return loss, torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]), torch.tensor([0, 0, 1])


def test_center_loss_hand_computed():
    loss, f, y = _three_samples()
    f.requires_grad_(True)
    value = loss(f, y)
    # squared distances 1, 4, 4; the authors' normalisation: their mean (no ½)
    assert value.item() == pytest.approx((1 + 4 + 4) / 3, abs=1e-6)
    value.backward()
    # ∂L/∂f_i = 2/B (f_i - c_{y_i}); the centres get none from the network's loss (a buffer)
    assert torch.allclose(f.grad, torch.tensor([[2 / 3, 0.0], [0.0, 4 / 3], [4 / 3, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("beta", [0.0005, 1.0])
def test_one_centre_step_is_the_authors_sgd_on_the_gradient_times_one_over_beta(beta):
    loss, f, y = _three_samples()
    # ∂L_C/∂c_j = 2/B Σ_{y_i = j} (c_j - f_i): c_0: 2/3 ((-1, 0) + (0, -2)) = (-2/3, -4/3); c_1: 2/3 (-2, 0)
    grad = loss.gradient(f, y)
    assert torch.allclose(grad, torch.tensor([[-2 / 3, -4 / 3], [-4 / 3, 0.0]]), atol=1e-6)
    loss.sgd_step(grad, lr=0.5)
    by_hand = torch.tensor([[1 / 3, 2 / 3], [5 / 3, 1.0]])  # c - 0.5 · ∂L_C/∂c
    assert torch.allclose(loss.centers, by_hand, atol=1e-6)
    # the authors' way: autograd of β·L_C into nn.Parameter centres, the gradient × 1/β, SGD at lr 0.5
    centres = torch.nn.Parameter(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    sgd = torch.optim.SGD([centres], lr=0.5)
    (beta * ((f - centres[y]) ** 2).sum(1).clamp(1e-12, 1e12).mean()).backward()
    centres.grad *= 1.0 / beta
    sgd.step()
    assert torch.allclose(loss.centers, centres.detach(), atol=1e-6)


def test_a_skipped_step_leaves_the_centres_even_with_a_nan_gradient():
    loss, _, _ = _three_samples()
    before = loss.centers.clone()
    loss.sgd_step(torch.full((2, 2), float("nan")), lr=0.5, ok=torch.tensor(0.0))
    assert torch.equal(loss.centers, before)
    loss.sgd_step(torch.ones(2, 2), lr=0.5, ok=torch.tensor(1.0))
    assert torch.allclose(loss.centers, before - 0.5)


def _baseline(tiny_synth, *sets):
    from tests.test_engine import _baseline as baseline  # the baseline on the tiny benchmark, set up on the CPU

    return baseline(tiny_synth, *sets)


def test_center_loss_is_off_by_default_on_the_embedded_benchmark_and_on_in_the_real_presets():
    from reid_ray.config import resolve_config

    assert resolve_config("baseline").params.center_loss_weight == 0
    real = resolve_config("baseline", preset="duke2market").params
    assert (real.center_loss_weight, real.center_lr) == (0.0005, 0.5)


@pytest.mark.parametrize("beta", [0.0005, 0.5])
def test_baseline_step_with_center_loss_moves_the_centres_by_hand_and_checkpoints_them(tiny_synth, beta):
    from reid_ray.methods import EpochContext

    method = _baseline(tiny_synth, f"center_loss_weight={beta}")
    batch = next(iter(method.train_loader))
    ctx = EpochContext(0)
    losses = method.train_step(batch, ctx)
    assert losses["loss"].item() == pytest.approx(
        (losses["ce"] + losses["triplet"] + beta * losses["center"]).item(), rel=1e-5)
    f, y = method.center_batch
    c = method.center_loss.centers.clone()
    assert losses["center"].item() == pytest.approx(((f - c[y]) ** 2).sum(1).mean().item(), rel=1e-5)
    method.optimizer.zero_grad()
    losses["loss"].backward()
    method.optimizer.step()
    method.after_step(ctx)
    # c_j ← c_j - 0.5 · 2/B Σ_{y_i = j} (c_j - f_i), whatever β
    expected = c.clone()
    for j in y.unique():
        expected[j] -= 0.5 * 2 / len(y) * (c[j] - f[y == j]).sum(0)
    assert torch.allclose(method.center_loss.centers, expected, atol=1e-5)
    assert not torch.equal(method.center_loss.centers, c)
    unseen = torch.ones(len(c), dtype=torch.bool)
    unseen[y] = False
    assert torch.equal(method.center_loss.centers[unseen], c[unseen])
    # the centres are part of the checkpoint: a fresh method resumes with them
    fresh = _baseline(tiny_synth, f"center_loss_weight={beta}")
    assert not torch.equal(fresh.center_loss.centers, method.center_loss.centers)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.center_loss.centers, method.center_loss.centers)


# --------------------------------------------------------------------------- MMT's source pretraining triplet

def test_softmax_triplet_of_mmt_pretraining_hand_computed():
    # the 4 points of the batch-hard test: (d_ap, d_an) per anchor (1, 3), (1, 2), (2, 2), (2, 4); the authors'
    # SoftTripletLoss(margin=0): -log softmax(d_ap, d_an)[negative] = -(d_an - log(e^d_ap + e^d_an))
    feats = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    terms = [-(n - math.log(math.exp(p) + math.exp(n))) for p, n in [(1, 3), (1, 2), (2, 2), (2, 4)]]
    assert SoftmaxTripletLoss()(feats, labels).item() == pytest.approx(sum(terms) / 4, abs=1e-5)
    # which is the soft-margin triplet log(1 + e^(d_ap - d_an))
    assert SoftmaxTripletLoss()(feats, labels).item() == pytest.approx(
        TripletLoss(soft_margin=True)(feats, labels).item(), abs=1e-6)


def test_baseline_softmax_triplet_switch(tiny_synth):
    method = _baseline(tiny_synth, "triplet=softmax")
    assert isinstance(method.triplet, SoftmaxTripletLoss) and method.center_loss is None
    assert isinstance(_baseline(tiny_synth).triplet, TripletLoss)
    from reid_ray import ReidRayError
    from reid_ray.config import resolve_config
    with pytest.raises(ReidRayError, match="params.triplet"):
        resolve_config("baseline", sets=["triplet=soft"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()` before `optimizer.step()`")
@pytest.mark.parametrize("fused", ["true", "false"])
def test_non_finite_steps_move_no_centre(tiny_synth, fused):
    """The centres' step honours a skipped step: on the device-side path (a fused optimiser: `ctx.step_ok` is 0)
    as on the host's (no `after_step`), though the step's features, and so the centres' gradient, are finite."""
    from reid_ray.methods import EpochContext
    from reid_ray.training.loop import train_epoch

    method = _baseline(tiny_synth, "center_loss_weight=0.0005", f"optim.fused={fused}")
    step = method.train_step
    method.train_step = lambda batch, ctx: {**(out := step(batch, ctx)), "loss": out["loss"] * float("nan")}
    before = method.center_loss.centers.clone()
    out = train_epoch(method, EpochContext(0))
    assert out["iters"] == 0 and out["skipped_steps"] > 0
    assert torch.equal(method.center_loss.centers, before)
