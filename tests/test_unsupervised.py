"""The fully unsupervised setting (`--source none`): no labelled source at all, the target alone from ImageNet (or,
for the embedded `small` network, random) weights, for the methods that define it (SpCL, Cluster Contrast). Its
config, presets and refusals before Ray; SpCL's target-only memory and the self-training reference in-process; a
sweep with no source under Ray Train and Tune, checked in MLflow for what a run without a source must not have."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from reid_ray import ReidRayError
from reid_ray.config import NO_SOURCE, resolve_config
from reid_ray.methods import METHODS


def test_no_source_resolves_for_the_methods_that_define_it_and_refuses_the_others():
    able = sorted(m for m, cls in METHODS.items() if cls.unsupervised is not None)
    assert able == ["cluster_contrast", "self_training", "spcl"]
    for method in able:
        cfg = resolve_config(method, NO_SOURCE)
        assert (cfg.source, cfg.target, cfg.has_source) == ("none", "synth-b", False)
        assert cfg.params.source_init is False and METHODS[method].source_models(cfg.params) == 0
        assert cfg.experiment_name == "none->synth-b" and cfg.model.pretrained == "none"  # `small`: random weights
    for method in sorted(set(METHODS) - set(able)):
        with pytest.raises(ReidRayError, match=f"{method} needs a labelled source.*runs cluster_contrast, self_training, spcl"):
            resolve_config(method, NO_SOURCE)
    assert resolve_config("spcl").has_source  # the default stays UDA, from synth-a


@pytest.mark.parametrize("preset, target, figures", [
    ("market", "market1501", {"spcl": (73.1, 88.1), "cluster_contrast": (82.1, 92.3)}),
    ("msmt17", "msmt17", {"spcl": (19.1, 42.3), "cluster_contrast": (27.6, 56.0)})])
def test_the_unsupervised_presets_train_from_imagenet_on_the_target_alone(preset, target, figures):
    from reid_ray.config.presets import resolve_preset

    p = resolve_preset(preset)
    assert (p["source"], p["target"]) == ("none", target)
    assert {m: (v["mAP"], v["R1"]) for m, v in p["published"].items()} == figures
    for method in figures:
        cfg = resolve_config(method, preset=preset)
        assert not cfg.has_source and cfg.params.source_init is False and cfg.model.pretrained == "imagenet"
        assert cfg.epochs == 50 and cfg.model.arch == "resnet50"
    with pytest.raises(ReidRayError, match="mmt needs a labelled source"):
        resolve_config("mmt", preset=preset)


def test_spcl_without_a_source_keeps_the_targets_rows_alone(tiny_synth):
    """The authors' USL trainer: a memory of the target's instances only, each step the target batch alone."""
    from reid_ray.clustering.client import LocalClusterer, run_spec
    from reid_ray.data.domains import load_domains
    from reid_ray.methods import EpochContext
    from reid_ray.training.loop import train_epoch

    cfg = resolve_config("spcl", NO_SOURCE, flags=dict(data_root=str(tiny_synth)),
                         sets=["num_identities=4", "iters=2", "min_samples=2", "k1=6", "k2=3"])
    domains = load_domains(cfg.source, cfg.target, cfg.data_root)
    assert domains.source is None and [role for role, _ in domains.named()] == ["target"]
    METHODS["spcl"].check(cfg, domains)
    m = METHODS["spcl"](cfg, domains, torch.device("cpu"))
    t = domains.target.train
    m.clusterer = LocalClusterer(run_spec(METHODS["spcl"], cfg), t["pid"].to_numpy(), t["camid"].to_numpy())
    m.setup()
    before = m.memory.features.clone()
    losses = train_epoch(m, EpochContext(epoch=0), amp=False)
    assert m.num_classes == 0 and m.memory.features.shape[0] == t.num_rows  # no source class rows
    assert math.isfinite(losses["loss"]) and "loss_source" not in losses
    assert not torch.equal(before, m.memory.features)  # filled from the target, then moved by the steps
    assert torch.allclose(m.memory.features.norm(dim=1), torch.ones(t.num_rows), atol=1e-4)


def test_self_training_resets_its_classifier_to_the_centroids_and_trains_on_their_labels(tiny_synth):
    """The plain k-means self-training reference: each epoch the classifier is the L2-normalised k-means centroids
    (the clusterer's), the Adam moments start afresh, and a step is BoT's CE + triplet on the pseudo-labels."""
    import torch.nn.functional as F

    from reid_ray.clustering.client import LocalClusterer, run_spec
    from reid_ray.data.domains import load_domains
    from reid_ray.methods import EpochContext
    from reid_ray.training.loop import train_epoch

    cfg = resolve_config("self_training", NO_SOURCE, flags=dict(data_root=str(tiny_synth)),
                         sets=["num_identities=4", "iters=2", "num_clusters=8"])
    domains = load_domains(cfg.source, cfg.target, cfg.data_root)
    cls = METHODS["self_training"]
    cls.check(cfg, domains)
    m = cls(cfg, domains, torch.device("cpu"))
    t = domains.target.train
    m.clusterer = LocalClusterer(run_spec(cls, cfg), t["pid"].to_numpy(), t["camid"].to_numpy())
    m.setup()
    seen = {}
    refresh = m.clusterer.refresh
    m.clusterer.refresh = lambda feats, epoch: seen.setdefault(epoch, refresh(feats, epoch))
    train_epoch(m, EpochContext(epoch=0), amp=False)
    assert m.optimizer.state  # Adam's moments after the epoch's steps ...
    m.on_epoch_start(EpochContext(epoch=1))
    assert not m.optimizer.state  # ... cleared at the next refresh
    w = m.eval_model().classifier.weight
    assert torch.allclose(w, torch.as_tensor(seen[1].centroids), atol=1e-6) and w.shape == (8, m.eval_model().feat_dim)
    assert torch.allclose(w.norm(dim=1), torch.ones(8), atol=1e-5)
    batch = next(iter(m.train_loader))
    losses = m.train_step(batch, EpochContext(epoch=1))
    out = m.eval_model()(batch["img"])
    y = batch["label"]
    smooth = torch.full((len(y), 8), 0.1 / 8).scatter_(1, y[:, None], 0.9 + 0.1 / 8)  # ε = 0.1 over k = 8 classes
    ce = -(smooth * F.log_softmax(out["logits"], 1)).sum(1).mean()
    assert torch.allclose(losses["ce"], ce, atol=1e-5) and torch.allclose(losses["loss"], ce + losses["triplet"])
    assert cls.check(cfg, domains) is None
    with pytest.raises(ReidRayError, match="params.num_clusters=5000: k-means needs"):
        cls.check(resolve_config("self_training", NO_SOURCE, sets=["num_clusters=5000"]), domains)


def test_a_run_without_a_source_has_no_source_row_in_its_summary(capsys):
    from reid_ray.cli.train import print_summary

    cfg = resolve_config("cluster_contrast", NO_SOURCE)
    print_summary(cfg, {"metrics": {"target_mAP": 81.5, "target_R1": 90.0}, "mlflow_uri": "sqlite:///m.db",
                        "mlflow_run_id": "abc", "wall_time": 1.0, "checkpoint": "c", "run_dir": "r"})
    out = capsys.readouterr().out
    assert "cluster_contrast: none -> synth-b" in out and "target synth-b (unsupervised)" in out and "81.5" in out
    assert "(supervised)" not in out and "nan" not in out


@pytest.mark.ray
def test_a_sweep_without_a_source_ranks_its_trials_with_no_direct_transfer(tmp_path):
    from reid_ray.data.synthetic import generate_synthetic
    from tests.conftest import TINY, run_cli

    generate_synthetic(tmp_path / "data", dataclasses.replace(TINY, domains=("synth-b",)))
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  params.eps: {distribution: uniform, low: 0.6, high: 0.7}\n"
                     "fixed:\n  loader.num_identities: 4\n  params.min_samples: 2\n  params.k1: 6\n  params.k2: 3\n"
                     "  params.iters: 2\n  log_model: false\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["-m", "reid_ray.tune", "--method", "spcl", "--source", "none", "--data-root", str(tmp_path / "data"),
                    "--search-space", str(space), "--num-samples", "1", "--epochs", "1", "--output",
                    str(tmp_path / "out"), "--mlflow-uri", uri, "--name", "usl"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "direct transfer" not in proc.stdout and "source model" not in proc.stdout
    assert not (tmp_path / "data" / "synth-a").exists()  # no source written, none read
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("none->synth-b").experiment_id])
    trials = [r for r in runs if r.data.tags.get("method") == "spcl" and "target_mAP" in r.data.metrics]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert trials[0].data.tags["source"] == "none" and trials[0].data.params["params.source_init"] == "False"
    assert [d.dataset.name for d in trials[0].inputs.dataset_inputs] == ["synth-b"]  # no source dataset logged
    assert not [k for r in runs for k in r.data.metrics if k.startswith(("source_", "direct_transfer"))]
    summary = next((tmp_path / "out").rglob("summary.md")).read_text()
    assert "none -> synth-b" in summary and "Direct transfer" not in summary
