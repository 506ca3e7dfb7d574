"""Cluster Contrast: its loss and memory updates on small tensors with hand-checked values, GeM pooling, one
epoch in-process with an exact checkpoint round trip, and a run under Ray Train on 2 workers with the actor."""

import math

import pytest
import torch
import torch.nn.functional as F

from reid_ray.losses.cluster_contrast import ClusterMemory, hard_update
from reid_ray.losses.spcl import momentum_update


def _memory(rows, temp=0.5, momentum=0.5, update="momentum"):
    mem = ClusterMemory(len(rows[0]), temp, momentum, update)
    mem.reset(torch.tensor(rows, dtype=torch.float32))
    return mem


def test_the_loss_is_infonce_over_the_cluster_rows():
    # f = (1, 0) against rows (1, 0), (0, 1), (-1, 0) at τ = 0.5: logits 2, 0, -2 for label 0
    mem = _memory([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss = mem(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))  # normalised by the memory: (2, 0) -> (1, 0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-4)), abs=1e-6)  # 0.142932
    assert loss.item() == pytest.approx(0.142932, abs=1e-6)


def test_the_gradient_uses_the_rows_before_the_update_then_the_rows_move():
    torch.manual_seed(0)
    rows = F.normalize(torch.randn(4, 3), dim=1)
    mem = _memory(rows.tolist(), temp=0.1, momentum=0.2)
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 2, 2, 1, 0])
    mem(x, y).backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.cross_entropy(F.normalize(x2, dim=1) @ rows.t() / 0.1, y).backward()  # the same loss on the old rows
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    expected = rows.clone()
    momentum_update(expected, F.normalize(x.detach(), dim=1), y, 0.2)
    assert torch.allclose(mem.features, expected) and torch.equal(mem.features[3], rows[3])  # row 3: no image


def test_the_momentum_update_takes_each_image_in_turn():
    memory = torch.tensor([[1.0, 0.0]])
    momentum_update(memory, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]), 0.5)
    # (1, 0) -> (0.5, 0.5)/‖·‖ = (0.7071, 0.7071) -> (0.3536, 0.8536)/0.9239 = (sin 22.5°, cos 22.5°)
    assert torch.allclose(memory[0], torch.tensor([0.382683, 0.923880]), atol=1e-6)


def test_the_hard_update_takes_each_clusters_least_similar_image_once():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])  # label 0: similarities 0.6 and 0; label 1: 0.6
    hard_update(memory, feats, torch.tensor([0, 0, 1]), 0.5)
    assert torch.allclose(memory[0], torch.tensor([0.707107, 0.707107]), atol=1e-6)  # with (0, 1) only
    # label 1: (0.5·(0, 1) + 0.5·(0.8, 0.6)) = (0.4, 0.8) / 0.894427
    assert torch.allclose(memory[1], torch.tensor([0.447214, 0.894427]), atol=1e-6)


def test_gem_pooling_is_the_generalised_mean_with_a_learnable_exponent():
    from reid_ray.models.reid_net import GeM, ModelConfig, build_reid_net

    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # one channel, 2 x 2
    gem = GeM()
    assert gem(x).item() == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3), abs=1e-5)  # p = 3: 2.924
    gem.p.data.fill_(1.0)
    assert gem(x).item() == pytest.approx(2.5)  # p = 1: average pooling
    gem(x).sum().backward()
    assert gem.p.grad is not None  # p is trained
    net = build_reid_net(ModelConfig(arch="small", pooling="gem", sync_bn=False), 3)
    assert "pool.p" in dict(net.named_parameters())
    plain = build_reid_net(ModelConfig(arch="small", sync_bn=False), 3)
    assert not any(k.startswith("pool.") for k in plain.state_dict())  # avg: the checkpoints of before, unchanged


def test_a_bad_pooling_or_update_is_one_line_before_ray():
    from reid_ray import ReidRayError
    from reid_ray.config import resolve_config

    with pytest.raises(ReidRayError, match=r"model.pooling.*avg, gem"):
        resolve_config("baseline", sets=["model.pooling=max"])
    with pytest.raises(ReidRayError, match=r"params.memory_update.*momentum, hard"):
        resolve_config("cluster_contrast", sets=["memory_update=soft"])


def test_one_epoch_in_process_and_an_exact_checkpoint_round_trip(tiny_synth):
    from reid_ray.clustering.client import LocalClusterer, run_spec
    from reid_ray.config import resolve_config
    from reid_ray.data.domains import load_domains
    from reid_ray.methods import EpochContext, method_class
    from reid_ray.training.loop import train_epoch

    cfg = resolve_config("cluster_contrast", flags=dict(data_root=str(tiny_synth)),
                         sets=["num_identities=4", "num_instances=4", "iters=2", "min_samples=2", "eps=0.5",
                               "source_init=false"])
    assert cfg.model.pooling == "gem"
    domains = load_domains(cfg.source, cfg.target, cfg.data_root)
    cls = method_class("cluster_contrast")

    def build():
        m = cls(cfg, domains, torch.device("cpu"))
        t = domains.target.train
        m.clusterer = LocalClusterer(run_spec(cls, cfg), t["pid"].to_numpy(), t["camid"].to_numpy())
        m.setup()
        return m

    method = build()
    losses = train_epoch(method, EpochContext(epoch=0), amp=False)
    assert math.isfinite(losses["loss"]) and method.last_stats["pseudo_clusters"] >= 1
    rows = method.memory.features
    assert rows.shape == (int(method.last_stats["pseudo_clusters"]), method.eval_model().feat_dim)
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-5)  # the updates keep them unit
    state = method.state_dict()
    again = build()
    again.load_state_dict(state)
    assert torch.equal(again.memory.features, method.memory.features)
    assert set(cls.retrieval_networks(state)) == {"net"}


@pytest.mark.ray
def test_cluster_contrast_trains_under_ray_on_two_workers_with_the_actor(ray_local, tiny_synth, tmp_path):
    from mlflow.tracking import MlflowClient

    from reid_ray.cli.train import build_parser, config_from_args, main
    from tests.conftest import seed_source_models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--method", "cluster_contrast", "--data-root", str(tiny_synth), "--output", str(tmp_path / "out"),
            "--mlflow-uri", uri, "--workers", "2", "--epochs", "2", "--eval-every", "2", "--name", "cc",
            "--set", "num_identities=4", "--set", "eps=0.5", "--set", "min_samples=2", "--set", "iters=2",
            "--set", "pretrain_epochs=1", "--set", "log_model=false"]
    seed_source_models(config_from_args(build_parser().parse_args(argv)))  # its source model: cached, not under Ray
    assert main(argv) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("synth-a->synth-b").experiment_id],
                                "tags.mlflow.runName = 'cc'")
    m = run.data.metrics
    assert run.info.status == "FINISHED" and m["pseudo_labels_checksum_ok"] == 1 and 0 <= m["target_mAP"] <= 100
    assert len(client.get_metric_history(run.info.run_id, "pseudo_clusters")) == 2
    assert run.data.params["model.pooling"] == "gem"
