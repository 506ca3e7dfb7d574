"""SpCL: the hybrid memory's unified contrastive loss (empty labels masked), momentum update and its two call
orders, the self-paced reliability criteria (hand-checked on small tensors), the memory under DDP, and the
method end to end."""

import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from reid_ray.clustering.self_paced import reliability, select_reliable, thresholds, unique_outliers
from reid_ray.losses.spcl import HybridMemory, momentum_update, unified_contrastive_loss


def test_unified_contrastive_loss_hand_computed():
    # rows: source centroids w0, w1; target instances v0, v1 (one cluster, label 2) and v2 (un-clustered, label 3)
    rows = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0.6, 0.8], [0.6, 0.8, 0]])
    labels = torch.tensor([0, 1, 2, 2, 3])
    f = torch.tensor([[0.6, 0.8, 0.0]])
    tau = 0.5
    # per-label similarities: w0 0.6, w1 0.8, cluster mean(0, 0.48) = 0.24, v2 1.0; over τ: 1.2, 1.6, 0.48, 2.0
    logits = torch.tensor([1.2, 1.6, 0.48, 2.0])
    for target in range(4):
        expected = -(logits[target] - torch.logsumexp(logits, 0))
        got = unified_contrastive_loss(f @ rows.T / tau, labels, torch.tensor([target]))
        assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert -(0.48 - math.log(sum(math.exp(v) for v in (1.2, 1.6, 0.48, 2.0)))) == pytest.approx(
        unified_contrastive_loss(f @ rows.T / tau, labels, torch.tensor([2])).item(), abs=1e-6)


def test_momentum_update_is_sequential_in_batch_order():
    mem = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # row 0 written twice by (0, 1): 0.2·(1, 0) + 0.8·(0, 1) = (0.2, 0.8) -> (0.2425, 0.9701);
    # then 0.2·(0.2425, 0.9701) + 0.8·(0, 1) = (0.0485, 0.9940) -> (0.0487, 0.9988). Row 1 untouched.
    momentum_update(mem, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]), momentum=0.2)
    assert torch.allclose(mem[0], torch.tensor([0.0487, 0.9988]), atol=1e-4) and torch.equal(mem[1], torch.tensor([1.0, 0]))
    mem = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    momentum_update(mem, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1]), momentum=0.2)
    assert torch.allclose(mem, F.normalize(torch.tensor([[0.2, 0.8], [0.8, 0.2]]), dim=1))


def test_memory_gradient_uses_the_old_rows_then_updates_them():
    torch.manual_seed(0)
    memory = HybridMemory(4, 6, temp=0.05, momentum=0.2)
    memory.features.copy_(F.normalize(torch.randn(6, 4), dim=1))
    memory.labels.copy_(torch.tensor([0, 1, 2, 2, 3, 4]))
    old = memory.features.clone()
    f = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    rows = torch.tensor([1, 2, 5])
    memory(f, rows).sum().backward()
    ref_f = f.detach().clone().requires_grad_()
    unified_contrastive_loss(ref_f @ old.T / 0.05, memory.labels, memory.labels[rows]).sum().backward()
    assert torch.allclose(f.grad, ref_f.grad, atol=1e-5)
    expected = old.clone()
    momentum_update(expected, f.detach(), rows, 0.2)
    assert torch.allclose(memory.features, expected) and torch.equal(memory.features[[0, 3, 4]], old[[0, 3, 4]])


# The hand example of both orders: τ = 0.5, m = 0.2; rows w0, w1 (source classes 0, 1), v0, v1 (target cluster,
# label 2), v2 (un-clustered, label 3). One source image of class 0 (writes w0), one target image of v1 (writes v1).
_ROWS = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0.6, 0.8], [0.6, 0.8, 0]]
_F_S, _F_T = [0.6, 0.8, 0.0], [0.0, 0.8, 0.6]


def _step(memory_calls: str):
    """A step of SpCL's train_step on the hand example: the loss, the source and target gradients, the memory."""
    memory = HybridMemory(3, 5, temp=0.5, momentum=0.2)
    memory.features.copy_(torch.tensor(_ROWS))
    memory.labels.copy_(torch.tensor([0, 1, 2, 2, 3]))
    f_s, f_t = torch.tensor([_F_S], requires_grad=True), torch.tensor([_F_T], requires_grad=True)
    rows_s, rows_t = torch.tensor([0]), torch.tensor([3])
    if memory_calls == "two":
        loss = memory(f_s, rows_s).mean() + memory(f_t, rows_t).mean()
    else:
        losses = memory(torch.cat([f_s, f_t]), torch.cat([rows_s, rows_t]))
        loss = losses[:1].mean() + losses[1:].mean()
    loss.backward()
    return loss.item(), f_s.grad[0], f_t.grad[0], memory.features.clone()


def _hand_gradient(per_label_logits, target, rows, row_labels, tau):
    """dL/df of Eq. 2 = Σ_r (p_l(r) − [l(r) = y]) / (|l(r)| τ) · r, with r the rows the backward multiplies by."""
    p = [math.exp(z) for z in per_label_logits]
    p = [v / sum(p) for v in p]
    sizes = [row_labels.count(label) for label in row_labels]
    coef = [(p[label] - (label == target)) / (size * tau) for label, size in zip(row_labels, sizes)]
    return torch.tensor([sum(c * r[j] for c, r in zip(coef, rows)) for j in range(3)])


def test_two_memory_calls_take_the_source_gradient_against_the_target_update():
    # source f_s = (0.6, 0.8, 0): similarities 0.6, 0.8, (0 + 0.48)/2, 1.0; over τ 1.2, 1.6, 0.48, 2.0; label 0.
    # target f_t = (0, 0.8, 0.6): similarities 0, 0.8, (0.6 + 0.96)/2, 0.64; over τ 0, 1.6, 1.56, 1.28; label 2
    z_s, z_t = [1.2, 1.6, 0.48, 2.0], [0.0, 1.6, 1.56, 1.28]
    lse = lambda z: math.log(sum(math.exp(v) for v in z))  # noqa: E731
    loss = -(1.2 - lse(z_s)) - (1.56 - lse(z_t))
    # the target writes v1: 0.2·(0, 0.6, 0.8) + 0.8·(0, 0.8, 0.6) = (0, 0.76, 0.64), over its norm √0.9872;
    # the source writes w0: 0.2·(1, 0, 0) + 0.8·(0.6, 0.8, 0) = (0.68, 0.64, 0), over √0.8720
    moved = [list(r) for r in _ROWS]
    moved[3] = [0.0, 0.76 / math.sqrt(0.9872), 0.64 / math.sqrt(0.9872)]
    after = torch.tensor(moved)
    after[0] = torch.tensor([0.68, 0.64, 0.0]) / math.sqrt(0.8720)
    labels = [0, 1, 2, 2, 3]
    old_grad_s = _hand_gradient(z_s, 0, _ROWS, labels, 0.5)
    new_grad_s = _hand_gradient(z_s, 0, moved, labels, 0.5)    # the authors': against the moved v1
    grad_t = _hand_gradient(z_t, 2, _ROWS, labels, 0.5)        # against the rows as they were, in both
    two, one = _step("two"), _step("one")
    for (value, g_s, g_t, memory), want_s in ((two, new_grad_s), (one, old_grad_s)):
        assert value == pytest.approx(loss, abs=1e-5)
        assert torch.allclose(g_s, want_s, atol=1e-5) and torch.allclose(g_t, grad_t, atol=1e-5)
        assert torch.allclose(memory, after, atol=1e-6)  # the same memory after the step, either order
    assert torch.equal(two[3], one[3]) and torch.equal(two[2], one[2])
    # only the source gradient differs: by p(label 2) / (2τ) · (v1' − v1), p(label 2) = e^0.48 / Σ e^z = 0.0935,
    # v1' − v1 = (0, 0.1649, −0.1559): 1.2 % of the gradient's norm here
    assert torch.allclose(two[1] - one[1], torch.tensor([0.0, 0.01542, -0.01458]), atol=1e-5)
    assert (two[1] - one[1]).norm() / one[1].norm() == pytest.approx(0.0123, abs=5e-4)


def test_two_memory_calls_equal_a_manual_target_then_source_backward():
    # random rows at the paper's τ = 0.05: source classes 0-2, then 8 target instances in clusters and singletons
    torch.manual_seed(0)
    rows = F.normalize(torch.randn(11, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 3, 3, 4, 4, 5, 6, 7])
    f_s, f_t = F.normalize(torch.randn(4, 4), dim=1), F.normalize(torch.randn(4, 4), dim=1)
    rows_s, rows_t = torch.tensor([0, 0, 2, 1]), torch.tensor([3, 6, 8, 10])
    grads = {}
    for calls in ("two", "one"):
        memory = HybridMemory(4, 11, temp=0.05, momentum=0.2)
        memory.features.copy_(rows)
        memory.labels.copy_(labels)
        s, t = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
        if calls == "two":
            (memory(s, rows_s).mean() + memory(t, rows_t).mean()).backward()
        else:
            losses = memory(torch.cat([s, t]), torch.cat([rows_s, rows_t]))
            (losses[:4].mean() + losses[4:].mean()).backward()
        grads[calls] = (s.grad, t.grad, memory.features)

    def grad(f, rows_now, logits_rows, own):  # the scores' gradient from the forward rows, times the rows now
        scores = (f @ logits_rows.T).requires_grad_()
        unified_contrastive_loss(scores / 0.05, labels, labels[own]).mean().backward()
        return scores.grad @ rows_now

    moved = rows.clone()
    momentum_update(moved, f_t, rows_t, 0.2)  # the target's backward first: its rows moved
    after = moved.clone()
    momentum_update(after, f_s, rows_s, 0.2)  # then the source's
    g_s, g_t, memory = grads["two"]
    assert torch.allclose(g_t, grad(f_t, rows, rows, rows_t), atol=1e-5)
    assert torch.allclose(g_s, grad(f_s, moved, rows, rows_s), atol=1e-5)
    assert torch.allclose(memory, after, atol=1e-6) and torch.equal(memory, grads["one"][2])
    assert torch.allclose(grads["one"][0], grad(f_s, rows, rows, rows_s), atol=1e-5)
    assert torch.equal(grads["one"][1], g_t)
    diff = ((g_s - grads["one"][0]).norm() / grads["one"][0].norm()).item()
    assert diff > 0.3, diff  # 55 % here (random rows and features at τ = 0.05)


def test_a_label_without_rows_is_masked_out_of_the_softmax():
    # the hand example with label 2 left empty (its rows relabelled 3, the un-clustered row 4): per-label
    # similarities of f = (0.6, 0.8, 0) are w0 0.6, w1 0.8, mean(0, 0.48) = 0.24, 1.0 (labels 0, 1, 3, 4)
    rows, f, tau = torch.tensor(_ROWS), torch.tensor([_F_S], requires_grad=True), 0.5
    labels = torch.tensor([0, 1, 3, 3, 4])
    z = [1.2, 1.6, 0.48, 2.0]
    for target, z_y in ((0, 1.2), (3, 0.48), (4, 2.0)):
        want = -(z_y - math.log(sum(math.exp(v) for v in z)))  # a logit of 0 for label 2 would add e⁰ = 1
        got = unified_contrastive_loss(f @ rows.T / tau, labels, torch.tensor([target]))
        assert got.item() == pytest.approx(want, abs=1e-6)
    unified_contrastive_loss(f @ rows.T / tau, labels, torch.tensor([0])).sum().backward()
    assert torch.allclose(f.grad[0], _hand_gradient([1.2, 1.6, -math.inf, 0.48, 2.0], 0, _ROWS, [0, 1, 3, 3, 4], tau),
                          atol=1e-5)
    memory = HybridMemory(3, 5, temp=tau)  # the same through the memory
    memory.features.copy_(rows)
    memory.labels.copy_(labels)
    assert memory(torch.tensor([_F_S]), torch.tensor([2])).item() == pytest.approx(
        -(0.48 - math.log(sum(math.exp(v) for v in z))), abs=1e-6)


def test_reliability_criteria_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, -1])
    tight = np.array([0, 0, -1, 1, 1, -1])
    loose = np.array([0, 0, 0, 0, 0, -1])
    r_indep, r_comp = reliability(labels, tight, loose)
    # cluster 0: |{0,1,2} ∩ {0..4}| / |{0..4}| = 3/5; cluster 1: 2/5
    assert np.allclose(r_indep, [0.6, 0.4])
    # point 2 has left its tight cluster: |{0,1,2} ∩ {2}| / 3 = 1/3; points 0, 1: 2/3; 3, 4: 1; the outlier: 0
    assert np.allclose(r_comp, [2 / 3, 2 / 3, 1 / 3, 1, 1, 0])
    indep_thr, comp_thr = thresholds(labels, r_indep, r_comp, alpha=0.5, beta=0.5)
    assert indep_thr == pytest.approx(0.5) and comp_thr == pytest.approx(2 / 3)
    kept = select_reliable(labels, r_indep, r_comp, indep_thr, comp_thr)
    assert kept.tolist() == [0, 0, -1, -1, -1, -1]
    assert unique_outliers(kept).tolist() == [0, 0, 1, 2, 3, 4]


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    memory, feats, rows = _memory_and_batch()
    half = len(rows) // world
    share = slice(rank * half, (rank + 1) * half)
    memory(feats[share].requires_grad_(), rows[share]).sum().backward()
    torch.save(memory.features, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _memory_and_batch():
    torch.manual_seed(0)
    memory = HybridMemory(4, 7, temp=0.05, momentum=0.2)
    memory.features.copy_(F.normalize(torch.randn(7, 4), dim=1))
    memory.labels.copy_(torch.tensor([0, 1, 2, 2, 3, 4, 5]))
    feats = F.normalize(torch.randn(4, 4), dim=1)
    return memory, feats, torch.tensor([0, 3, 0, 6])  # source class 0 is written from both ranks, in order


def test_memory_identical_on_two_ranks_and_equal_to_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    memory, feats, rows = _memory_and_batch()
    memory(feats.requires_grad_(), rows).sum().backward()
    assert torch.equal(r0, r1) and torch.allclose(r0, memory.features, atol=1e-6)


def _method(tiny_synth, *sets):
    from reid_ray.clustering.client import LocalClusterer
    from reid_ray.config import resolve_config
    from reid_ray.data.readers import read_dataset
    from reid_ray.methods import METHODS, Domains

    cfg = resolve_config("spcl", sets=["num_identities=4", "k1=10", "eps=0.5", "min_samples=2", "iters=3", *sets],
                         flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["spcl"](cfg, domains, torch.device("cpu"))
    t = domains.target.train
    method.clusterer = LocalClusterer(METHODS["spcl"].cluster_spec(cfg), t["pid"].to_numpy(), t["camid"].to_numpy())
    method.setup()
    return method


def test_spcl_trains_and_its_state_resumes_exactly(tiny_synth):
    from reid_ray.methods import EpochContext
    from reid_ray.training.loop import train_epoch

    method = _method(tiny_synth)
    out = train_epoch(method, EpochContext(0))
    c = method.num_classes
    assert out["iters"] == 3 and math.isfinite(out["loss"]) and {"loss_source", "loss_target"} <= set(out)
    assert out["pseudo_clusters"] >= 1 and out["pseudo_unclustered"] >= 0 and method.thresholds is not None
    assert torch.allclose(method.memory.features.norm(dim=1), torch.ones(len(method.memory.features)), atol=1e-5)
    assert torch.equal(method.memory.labels[:c], torch.arange(c))  # source rows keep their classes
    state = method.state_dict()
    again = _method(tiny_synth)
    again.load_state_dict(state)
    assert torch.equal(again.memory.features, method.memory.features) and again.thresholds == method.thresholds
    assert again.started  # a resumed run does not refill its memory


@pytest.mark.ray
def test_spcl_trains_under_ray_on_two_workers_with_the_actor(ray_local, tiny_synth, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from reid_ray.cli.train import build_parser, config_from_args, main
    from tests.conftest import seed_source_models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--method", "spcl", "--data-root", str(tiny_synth), "--output", str(tmp_path / "out"),
            "--mlflow-uri", uri, "--workers", "2", "--epochs", "2", "--eval-every", "2", "--name", "spcl",
            "--set", "num_identities=4", "--set", "k1=10", "--set", "eps=0.5", "--set", "min_samples=2",
            "--set", "iters=2", "--set", "pretrain_epochs=1", "--set", "log_model=false"]
    seed_source_models(config_from_args(build_parser().parse_args(argv)))  # its source model: cached, not under Ray
    assert main(argv) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("synth-a->synth-b").experiment_id],
                                "tags.mlflow.runName = 'spcl'")
    m = run.data.metrics
    assert run.info.status == "FINISHED" and m["pseudo_labels_checksum_ok"] == 1 and 0 <= m["target_mAP"] <= 100
    assert len(client.get_metric_history(run.info.run_id, "pseudo_clusters")) == 2
