"""MMT and its losses, Ray-free: hand-checked soft losses, EMA, and a short adaptation run."""

import copy
import math

import numpy as np
import pytest
import torch

from reid_ray import ReidRayError
from reid_ray.clustering.client import ClusterSpec, LocalClusterer
from reid_ray.config import resolve_config
from reid_ray.data.readers import read_dataset
from reid_ray.losses.mmt import SoftCrossEntropy, SoftmaxTripletLoss
from reid_ray.methods import METHODS, Domains, EpochContext
from reid_ray.methods.mmt import ema_update
from reid_ray.models.reid_net import build_reid_net
from reid_ray.training.loop import evaluate_method, train_epoch


def test_soft_cross_entropy_hand_computed():
    logits, ref = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    # p = [1/4, 3/4]; target = [1/2, 1/2]: -(1/2 log 1/4 + 1/2 log 3/4)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert SoftCrossEntropy()(logits, ref).item() == pytest.approx(expected, rel=1e-6)


def test_softmax_triplet_hard_and_soft_hand_computed():
    feats = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    pairs = [(1, 3), (1, 2), (2, 2), (2, 4)]  # (d_ap, d_an) of each anchor, batch-hard
    tau = [math.exp(n) / (math.exp(p) + math.exp(n)) for p, n in pairs]
    hard = sum(-math.log(t) for t in tau) / 4
    assert SoftmaxTripletLoss()(feats, labels).item() == pytest.approx(hard, abs=1e-5)
    # reference features: same anchors/positives/negatives, other distances (scaled by 2)
    tau_ref = [math.exp(2 * n) / (math.exp(2 * p) + math.exp(2 * n)) for p, n in pairs]
    bce = sum(-(r * math.log(t) + (1 - r) * math.log(1 - t)) for r, t in zip(tau_ref, tau)) / 4
    assert SoftmaxTripletLoss()(feats, labels, 2 * feats).item() == pytest.approx(bce, abs=1e-5)


def test_ema_warm_start_then_alpha():
    ema, net = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.fill_(0.0)
    net.weight.data.fill_(1.0)
    ema_update(ema, net, alpha=0.9, step=0)  # a = min(1 - 1/1, 0.9) = 0: copy
    assert ema.weight.item() == pytest.approx(1.0)
    net.weight.data.fill_(2.0)
    ema_update(ema, net, alpha=0.9, step=1)  # a = min(0.5, 0.9) = 0.5
    assert ema.weight.item() == pytest.approx(1.5)
    ema_update(ema, net, alpha=0.9, step=100)  # a = 0.9
    assert ema.weight.item() == pytest.approx(0.9 * 1.5 + 0.1 * 2.0)


def test_mmt_refreshes_pseudo_labels_and_trains(tiny_synth):
    cfg = resolve_config("mmt", sets=["num_identities=4", "num_clusters=10", "iters=4"],
                         flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["mmt"](cfg, domains, torch.device("cpu"))
    truth = domains.target.train["pid"].to_numpy()
    method.clusterer = LocalClusterer(ClusterSpec(num_clusters=10), truth)
    method.setup()
    ctx = EpochContext(0)
    method.on_epoch_start(ctx)
    # classifiers were reset from the (normalised) centroids
    w = method.models["net1"].classifier.weight
    assert w.shape[0] == 10 and torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-5)
    out = train_epoch(method, ctx)
    for key in ("loss", "ce", "triplet", "soft_ce", "soft_triplet", "pseudo_nmi", "pseudo_cluster_time",
                "pseudo_num_clusters", "refresh_time"):
        assert key in out, key
    assert out["iters"] == 4 and np.isfinite(out["loss"])  # exactly `iters`, the sampler restarted as needed
    before = [p.clone() for p in method.emas[0].parameters()]
    ctx.epoch = 1
    train_epoch(method, ctx)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.emas[0].parameters()))
    metrics, _ = evaluate_method(method, domains.target, cfg, "target")
    assert {"target_mAP", "target_mAP_mean_net1", "target_mAP_mean_net2"} <= set(metrics)
    # the reported network is mean net 1 whatever the two score: no selection on the evaluated labels
    assert metrics["target_mAP"] == metrics["target_mAP_mean_net1"] != metrics["target_mAP_mean_net2"]


def test_two_nets_start_from_two_source_models(tiny_synth):
    """The paper (and its code) starts net 1 / net 2 and their mean nets from source models of two seeds."""
    cfg = resolve_config("mmt", sets=["num_identities=4", "num_clusters=10"], flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    states = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        states.append(build_reid_net(cfg.model, 7, torch.device("cpu")).state_dict())
    method = METHODS["mmt"](cfg, domains, torch.device("cpu"))
    method.init_states = states
    method.setup()
    for i, (net, ema) in enumerate(zip(method.models.values(), method.emas)):
        for name, v in net.state_dict().items():
            if not name.startswith("classifier."):
                assert torch.equal(v, states[i][name]) and torch.equal(ema.state_dict()[name], v), (i, name)
    w1, w2 = (next(m.parameters()) for m in method.models.values())
    assert not torch.equal(w1, w2)


def test_source_inits_pretrain_seed_and_seed_plus_one(monkeypatch, tmp_path):
    import reid_ray.distributed.driver as train

    seeds = []

    def fake_pretraining(cfg):
        seeds.append(cfg.seed)
        path = tmp_path / f"baseline-s{cfg.seed}.pt"
        path.write_bytes(b"x")
        return str(path)

    monkeypatch.setattr(train, "source_pretraining", fake_pretraining)
    cfg = resolve_config("mmt", flags=dict(seed=3))
    assert train.source_inits(cfg) == [str(tmp_path / "baseline-s3.pt"), str(tmp_path / "baseline-s4.pt")]
    monkeypatch.chdir(tmp_path)  # relative paths come back absolute (Ray workers run elsewhere)
    assert train.source_inits(resolve_config("mmt", sets=["two_sources=false"], flags=dict(init=["baseline-s3.pt"]))) == [
        str(tmp_path / "baseline-s3.pt")]
    assert seeds == [3, 4]
    assert len(train.source_inits(resolve_config("mmt", sets=["two_sources=false"], flags=dict(seed=3)))) == 1
    assert train.source_inits(resolve_config("baseline")) == []
    given = resolve_config("mmt", flags=dict(init=[str(tmp_path / "baseline-s3.pt"), str(tmp_path / "nowhere.pt")]))
    with pytest.raises(ReidRayError, match="--init .*nowhere.pt: no such checkpoint"):
        train.source_inits(given)


def test_cli_two_inits_only_for_mmt(tmp_path, capsys):
    from reid_ray.cli.train import main

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert main(["--method", "ecn", "--init", str(a), str(b), "--data-root", str(tmp_path)]) == 2
    assert "ecn starts from one source model" in capsys.readouterr().err


@pytest.mark.parametrize("reset", [True, False])
def test_adam_moments_reset_at_every_refresh_as_the_authors_new_optimiser(tiny_synth, reset):
    cfg = resolve_config("mmt", sets=["num_identities=4", "num_clusters=10", "iters=2", f"reset_optimizer={reset}"],
                         flags=dict(data_root=str(tiny_synth)))
    assert cfg.optim.warmup_epochs == 0 and tuple(cfg.optim.milestones) == ()  # the paper's constant lr
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["mmt"](cfg, domains, torch.device("cpu"))
    method.clusterer = LocalClusterer(ClusterSpec(num_clusters=10), domains.target.train["pid"].to_numpy())
    method.setup()
    train_epoch(method, EpochContext(0))
    assert len(method.optimizer.state) > 0
    method.on_epoch_start(EpochContext(1))  # a refresh: new clusters behind the classifier rows
    # a fresh optimiser's state, in place (steps 0, moments 0: training.optim.reset_optimizer_state)
    fresh = all(not v.any() for s in method.optimizer.state.values() for v in s.values())
    assert fresh == reset


def test_ema_weight_scaled_on_the_device_by_the_steps_flag():
    """A device-side skip hands the mean-net update a 0/1 flag tensor: 0 leaves the mean net as it was, 1 is
    the plain update (to float rounding: e + w·(p - e) instead of lerp)."""
    torch.manual_seed(0)
    ema, net = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, net, alpha=0.9, step=5, ok=torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters()))
    plain = copy.deepcopy(ema)
    ema_update(plain, net, alpha=0.9, step=5)
    ema_update(ema, net, alpha=0.9, step=5, ok=torch.tensor(1.0))
    for a, b, e, p in zip(ema.parameters(), plain.parameters(), before, net.parameters()):
        assert torch.allclose(a, b, atol=1e-7) and torch.allclose(a, e + (p - e) / 6, atol=1e-7)  # a = min(1 - 1/6, 0.9)


def test_baseline_target_bn_batches_move_bn_statistics_towards_the_target_batch(tiny_synth):
    """`target_bn_batches` (the authors' PreTrainer): after the source forward, a target batch forwarded in train
    mode without gradients; a BatchNorm's running mean then is (1 - m)·[(1 - m)·r + m·μ_source] + m·μ_target."""
    from torch.nn.modules.batchnorm import _BatchNorm

    cfg = resolve_config("baseline", sets=["num_identities=4", "target_bn_batches=true"],
                         flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["baseline"](cfg, domains, torch.device("cpu"))
    method.setup()
    batch = next(iter(method.train_loader))
    assert batch["t_img"].shape == batch["img"].shape  # P×K target images beside the source's
    assert set(batch["t_pid"].tolist()) <= set(domains.target.train["pid"].to_pylist())
    bn = next(m for m in method.eval_model().modules() if isinstance(m, _BatchNorm))
    seen = []
    bn.register_forward_pre_hook(lambda mod, args: seen.append((args[0].detach().mean((0, 2, 3)),
                                                                torch.is_grad_enabled())))
    r, m = bn.running_mean.clone(), bn.momentum
    method.train_step(batch, EpochContext(0))
    (mu_source, grad_source), (mu_target, grad_target) = seen
    assert grad_source and not grad_target
    assert torch.allclose(bn.running_mean, (1 - m) * ((1 - m) * r + m * mu_source) + m * mu_target, atol=1e-5)
    # without the switch: the source batch alone
    plain = METHODS["baseline"](resolve_config("baseline", sets=["num_identities=4"],
                                               flags=dict(data_root=str(tiny_synth))), domains, torch.device("cpu"))
    plain.setup()
    assert "t_img" not in next(iter(plain.train_loader))
    assert len(plain.train_loader) == len(method.train_loader)  # an epoch stays one pass of the source


def test_pretraining_plan_with_the_authors_recipe(tmp_path):
    from reid_ray.distributed.driver import pretraining_plan

    bot = resolve_config("mmt", flags=dict(output=str(tmp_path)))
    assert bot.params.source_recipe == "bot"  # the embedded benchmark: its measured source models
    authors = resolve_config("mmt", sets=["source_recipe=authors"], flags=dict(output=str(tmp_path)))
    (bot_cache, bot_pre), (auth_cache, auth_pre) = pretraining_plan(bot), pretraining_plan(authors)
    assert (auth_pre.params.triplet, auth_pre.params.target_bn_batches) == ("softmax", True)
    assert (bot_pre.params.triplet, bot_pre.params.target_bn_batches) == ("hinge", False)
    assert auth_pre.params.center_loss_weight == bot_pre.params.center_loss_weight == 0  # the authors' has none
    assert auth_cache != bot_cache and auth_pre.name != bot_pre.name
    # every other method keeps BoT's recipe, its cache key as before (no params in it)
    assert METHODS["ecn"].pretrain_params(resolve_config("ecn").params) == {}
    real = resolve_config("mmt", preset="duke2market", flags=dict(output=str(tmp_path)))
    assert real.params.source_recipe == "authors"
    assert pretraining_plan(real)[1].params.triplet == "softmax"
