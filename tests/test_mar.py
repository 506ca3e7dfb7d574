"""MAR: every loss against a hand-computed example, the multilabel memory (alone and across two
DDP ranks), and one end-to-end run under Ray Train."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from reid_ray.losses.mar import (
    CrossViewMultilabelLoss,
    MultilabelDiscriminativeLoss,
    MultilabelMemory,
    agent_loss,
    agreement,
    joint_embedding_loss,
    soft_multilabels,
)


def test_soft_multilabels_and_agreement():
    f, agents = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = soft_multilabels(f, agents, scale=2.0).exp()  # softmax([2, 0])
    assert y[0].tolist() == pytest.approx([math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)], rel=1e-6)
    ml = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    assert torch.allclose(agreement(ml), torch.tensor([[1, 0.5, 0], [0.5, 1, 0.5], [0, 0.5, 1]]))


def test_mdl_splits_the_mined_pairs_by_agreement():
    # squared distances: (0,1) .01, (1,2) .04, (0,2) .09, (2,3) .49, (1,3) .81, (0,3) 1
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [1.0, 0.0]], requires_grad=True)
    ml = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # only (0, 1) agree
    mdl = MultilabelDiscriminativeLoss(mining_ratio=0.5)  # 3 of the 6 pairs mined
    mdl.threshold.fill_(0.5)
    loss, stats = mdl(feats, ml, pids=torch.tensor([7, 7, 8, 9]))
    p, n = math.exp(-0.01), (math.exp(-0.04) + math.exp(-0.09)) / 2  # P = {(0,1)}, N = {(1,2), (0,2)}
    assert loss.item() == pytest.approx(-math.log(p / (p + n)), rel=1e-5)
    assert stats["mdl_pos_pairs"].item() == 1 and stats["mdl_true_pos_pairs"].item() == 1
    # EMA of the threshold toward the batch's 3rd largest agreement (0): 0.9 · 0.5 + 0.1 · 0
    assert mdl.threshold.item() == pytest.approx(0.45)
    loss.backward()
    assert feats.grad[3].abs().sum() == 0  # (·, 3) pairs were not mined
    # no positive above the threshold: P̄ = 1 (the authors' fallback), every mined pair a negative
    mdl.threshold.fill_(1.5)
    loss, _ = mdl(feats.detach(), ml)
    assert loss.item() == pytest.approx(math.log(1 + (math.exp(-0.01) + math.exp(-0.04) + math.exp(-0.09)) / 3),
                                        rel=1e-5)


def test_mdl_threshold_init_from_the_whole_set():
    ml = torch.tensor([[1.0, 0], [1.0, 0], [0.5, 0.5], [0, 1.0]])  # agreements: 1, .5, 0, .5, 0, .5
    mdl = MultilabelDiscriminativeLoss(mining_ratio=0.34)  # int(6 · 0.34) = 2: 2nd largest
    mdl.init_threshold(ml)
    assert mdl.threshold.item() == pytest.approx(0.5)


def test_cml_on_two_cameras():
    log_ml = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 3.0], [1.0, 5.0]], requires_grad=True)
    cams = torch.tensor([0, 0, 1, 1])
    cml = CrossViewMultilabelLoss(2, momentum=0.0)
    cml.center_mean.copy_(torch.tensor([1.0, 2.0]))
    cml.center_std.copy_(torch.tensor([1.0, 1.0]))
    # camera 0: μ = (1, 1), σ = (√2, √2); camera 1: μ = (1, 4), σ = (0, √2)
    r = math.sqrt(2) - 1
    cam0 = (0 + 1) + (r * r + r * r)
    cam1 = (0 + 4) + (1 + r * r)
    assert cml(log_ml, cams).item() == pytest.approx((cam0 + cam1) / 2 / 2, rel=1e-5)
    # centres: the mean over cameras of their statistics, then an EMA of each batch's
    cml.init_centers(log_ml.detach(), cams)
    assert cml.center_mean.tolist() == pytest.approx([1.0, 2.5])
    assert cml.center_std.tolist() == pytest.approx([math.sqrt(2) / 2, math.sqrt(2)], rel=1e-5)
    cml.momentum = 0.5
    cml.center_mean.zero_()
    cml(log_ml, cams)
    assert cml.center_mean.tolist() == pytest.approx([0.5, 1.25])
    # a camera with a single image has no std and is left out
    one = cml(log_ml[:3], cams[:3])
    assert torch.isfinite(one)


def test_agent_loss_is_scaled_cross_entropy():
    f, agents = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert agent_loss(f, agents, torch.tensor([0]), scale=2.0).item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_rj_pulls_to_own_agent_and_pushes_hard_agents_beyond_the_margin():
    agents = torch.tensor([_unit(0), _unit(90), _unit(45)])
    src, labels = torch.tensor([_unit(0), _unit(90)]), torch.tensor([0, 1])
    tgt = torch.tensor([_unit(180), _unit(30)])
    d45, d30, d15 = (2 - 2 * math.cos(math.radians(a)) for a in (45, 30, 15))
    # m = 1: each source sample has one hard agent (a2 at 45°); target 180° has none; target 30°
    # has a0 and a2 (a1 at 60° is exactly at the margin: d² = 1, not hard)
    terms = [0.0, 0.0, 1 - d45, 1 - d45, ((1 - d30) + (1 - d15)) / 2]
    assert joint_embedding_loss(src, labels, tgt, agents, margin=1.0).item() == pytest.approx(
        sum(terms) / 5, abs=1e-5)
    # m = 0.5: no source hard agents; the 30° target still has two
    terms = [0.0, 0.0, ((0.5 - d30) + (0.5 - d15)) / 2]
    assert joint_embedding_loss(src, labels, tgt, agents, margin=0.5).item() == pytest.approx(
        sum(terms) / 3, abs=1e-5)
    # a source feature away from its agent: the positive term is ‖f - a_w‖²
    f = torch.tensor([_unit(180)], requires_grad=True)
    loss = joint_embedding_loss(f, torch.tensor([0]), tgt[:1], agents)
    assert loss.item() == pytest.approx(4.0, rel=1e-5)


def test_memory_update_is_an_ema():
    mem = MultilabelMemory(3, 2)
    mem.labels.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    mem.update(torch.tensor([2, 0]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert torch.allclose(mem.labels, torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.45, 0.55]]))


# ----------------------------------------------------------------------------- two DDP ranks (gloo)

def _mar(root: str, rank: int = 0, world: int = 1):
    from reid_ray.config import resolve_config
    from reid_ray.data.readers import read_dataset
    from reid_ray.methods import METHODS, Domains

    cfg = resolve_config("mar", sets=["num_identities=4", "params.mining_ratio=0.1"], flags=dict(data_root=root))
    domains = Domains(read_dataset("synth-a", root), read_dataset("synth-b", root))
    return METHODS["mar"](cfg, domains, torch.device("cpu"), rank, world)


def _one_step(method):
    from reid_ray.methods import EpochContext

    ctx = EpochContext(0, method.rank, method.world_size)
    method.on_epoch_start(ctx)
    before = method.memory.labels.clone()
    losses = method.train_step(next(iter(method.train_loader)), ctx)
    method.optimizer.zero_grad()
    losses["loss"].backward()
    method.optimizer.step()
    return before, losses


def _ddp_worker(rank: int, root: str, init_file: str, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    method = _mar(root, rank, 2)
    method.setup(wrap=DistributedDataParallel)
    before, losses = _one_step(method)
    net = method.eval_model()
    torch.save({"before": before, "after": method.memory.labels, "mdl": losses["mdl"], "cml": losses["cml"],
                "weight": net.classifier.weight.detach()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_memory_and_losses_identical_on_two_ddp_ranks_and_equal_one_process(tiny_synth, tmp_path):
    mp.spawn(_ddp_worker, args=(str(tiny_synth), str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["after"], r1["after"]) and torch.equal(r0["weight"], r1["weight"])
    changed = (r0["after"] != r0["before"]).any(1)
    assert changed.sum() == 16  # the global batch's rows, updated on both ranks
    # one process on the same global batch: same initial memory, same update, same global-batch losses
    single = _mar(str(tiny_synth))
    single.setup()
    before, losses = _one_step(single)
    assert torch.allclose(before, r0["before"], atol=1e-5)
    assert torch.allclose(single.memory.labels, r0["after"], atol=1e-5)
    assert losses["mdl"].item() == pytest.approx(r0["mdl"].item(), abs=1e-4)
    assert losses["cml"].item() == pytest.approx(r0["cml"].item(), rel=1e-4)
    upd = single.memory.labels[changed]
    assert torch.allclose(upd.sum(1), torch.ones(16), atol=1e-5)  # rows stay distributions
    w = F.normalize(single.eval_model().classifier.weight.detach(), dim=1)
    assert torch.allclose(w, F.normalize(r0["weight"], dim=1), atol=1e-4)
