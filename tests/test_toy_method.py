"""A method added in one file, registered the way a user registers one, trained through the same code
path as `python -m reid_ray.train` (reid_ray.train.main, under Ray Train). Nothing outside this file
knows about it: the Ray workers import this module by name (`Method.__module__`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from reid_ray.data.loader import build_train_loader, relabel
from reid_ray.methods import Method, register_method, unwrap
from reid_ray.models.reid_net import build_reid_net


@dataclass
class ToyParams:
    temperature: float = 0.1     # τ of the cosine-softmax classifier


@register_method
class Toy(Method):
    """Cosine-softmax classification on the source: the smallest method that trains and evaluates."""

    name = "toy"
    Params = ToyParams
    adapts = False
    synthetic_overrides = {"epochs": 2, "eval_every": 2, "optim.warmup_epochs": 0}

    def setup(self, wrap=lambda m: m) -> None:
        labels, _ = relabel(self.domains.source.train["pid"].to_numpy())
        torch.manual_seed(self.cfg.seed)
        net = build_reid_net(self.cfg.model, int(labels.max()) + 1, self.device)
        self.models = {"net": wrap(net)}
        self.build_optimizer(net)
        self.train_loader = build_train_loader(self.domains.source.train, labels, self.cfg.transform, self.cfg.loader,
                                               rank=self.rank, world_size=self.world_size, seed=self.cfg.seed)

    def train_step(self, batch, ctx):
        net = self.models["net"]
        out = net(batch["img"].to(self.device))
        w = F.normalize(unwrap(net).classifier.weight, dim=1)
        logits = F.normalize(out["bn_feat"], dim=1) @ w.T / self.p.temperature
        loss = F.cross_entropy(logits, batch["label"].to(self.device))
        return {"loss": loss, "ce": loss.detach()}

    def eval_model(self):
        return unwrap(self.models["net"])


def test_toy_method_is_registered_typed_and_resolved():
    from reid_ray.config import resolve_config
    from reid_ray.methods import METHODS

    assert METHODS["toy"] is Toy
    cfg = resolve_config("toy", sets=["temperature=0.05"])
    assert cfg.params == ToyParams(temperature=0.05) and cfg.epochs == 2


@pytest.mark.ray
def test_toy_method_trains_through_the_cli(ray_local, tiny_synth, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from reid_ray.cli.train import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--method", "toy", "--data-root", str(tiny_synth), "--output", str(tmp_path / "out"),
                 "--mlflow-uri", uri, "--name", "toy-run", "--workers", "1", "--set", "num_identities=4",
                 "--set", "params.temperature=0.2", "--set", "log_model=false"]) == 0
    assert "toy: synth-a -> synth-b" in capsys.readouterr().out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("synth-a->synth-b").experiment_id])
    assert run.info.run_name == "toy-run" and run.info.status == "FINISHED"
    assert run.data.params["params.temperature"] == "0.2" and run.data.tags["status"] == "completed"
    assert 0 <= run.data.metrics["target_mAP"] <= 100 and "ce" in run.data.metrics


def test_the_cli_finds_a_method_named_in_reid_ray_methods():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "REID_RAY_METHODS": "tests.test_toy_method"}
    out = subprocess.run([sys.executable, "-m", "reid_ray.train", "--method", "toy", "--set", "params.temperature=x"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    # resolved as the toy method's typed parameter (an unknown method would say "valid: ..." instead)
    assert out.returncode == 2 and "params.temperature='x': expected float" in out.stderr, out.stderr
