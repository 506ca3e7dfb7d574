"""Faults and mistakes that show only inside a Ray Train worker: one clear line on the driver, exit 2,
no worker traceback, no retries; a NaN loss skipped, then a "diverged" run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

from reid_ray import ReidRayError
from reid_ray.methods import register_method
from tests.ray_helpers import committed_epoch
from tests.test_toy_method import Toy, ToyParams


@dataclass
class FaultyParams(ToyParams):
    fail_rank: int = -1          # this rank raises a user error in setup (-1: none)
    nan_from_step: int = -1      # the loss is NaN from this global step on (-1: never)
    nan_steps: int = 10**9       # ... for this many steps


@register_method
class Faulty(Toy):
    """The toy method (tests/test_toy_method.py), with faults on request."""

    name = "faulty"
    Params = FaultyParams

    def setup(self, wrap=lambda m: m) -> None:
        if self.rank == self.p.fail_rank:
            raise ReidRayError(f"rank {self.rank} refuses: a mistake only a worker can see")
        super().setup(wrap)

    def train_step(self, batch, ctx):
        losses = super().train_step(batch, ctx)
        p = self.p
        if 0 <= p.nan_from_step <= ctx.iteration < p.nan_from_step + p.nan_steps and ctx.rank == ctx.world_size - 1:
            losses["loss"] = losses["loss"] * float("nan")  # on the last rank only: every rank must skip it all the same
        return losses


def test_a_nan_loss_is_skipped_and_counted_in_process(tiny_synth):
    from reid_ray.config import resolve_config
    from reid_ray.data.domains import load_domains
    from reid_ray.methods import EpochContext
    from reid_ray.training.loop import train_epoch

    cfg = resolve_config("faulty", sets=["nan_from_step=1", "nan_steps=2", "num_identities=2"],
                         flags=dict(data_root=str(tiny_synth)))
    method = Faulty(cfg, load_domains("synth-a", "synth-b", tiny_synth), torch.device("cpu"))
    method.setup()
    before = {k: v.clone() for k, v in method.eval_model().state_dict().items()}
    ctx = EpochContext(epoch=0)
    out = train_epoch(method, ctx)
    assert out["skipped_steps"] == 2 and out["iters"] == ctx.iteration - 2 >= 2 and ctx.nonfinite_in_a_row == 0
    after = method.eval_model().state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the finite steps trained


def test_diverges_after_max_nonfinite_steps_in_process(tiny_synth):
    from reid_ray import Diverged
    from reid_ray.config import resolve_config
    from reid_ray.data.domains import load_domains
    from reid_ray.methods import EpochContext
    from reid_ray.training.loop import train_epoch

    cfg = resolve_config("faulty", sets=["nan_from_step=1", "num_identities=4", "max_nonfinite_steps=2"],
                         flags=dict(data_root=str(tiny_synth)))
    method = Faulty(cfg, load_domains("synth-a", "synth-b", tiny_synth), torch.device("cpu"))
    method.setup()
    with pytest.raises(Diverged, match="2 non-finite losses in a row"):
        train_epoch(method, EpochContext(epoch=0))


def worker_tracebacks(text: str) -> list[str]:
    """Traceback lines printed by a Train worker or the driver (Ray's own daemons' aside: a second Ray
    instance on the machine makes its placement-group cleaner print one)."""
    return [line for line in text.splitlines() if "Traceback" in line and "PlacementGroupCleaner" not in line]


def _args(tmp_path, data_root, *sets):
    return ["--method", "faulty", "--data-root", str(data_root), "--output", str(tmp_path / "out"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "faults",
            "--set", "num_identities=4", "--set", "log_model=false", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.ray
def test_a_user_error_inside_a_worker_is_one_line_exit_2_and_not_retried(ray_local, tiny_synth, tmp_path, capfd):
    from reid_ray.cli.train import main

    assert main(_args(tmp_path, tiny_synth, "fail_rank=1", "max_failures=2")) == 2
    out, err = capfd.readouterr()
    assert "reid-ray: error: rank 1 refuses: a mistake only a worker can see" in err
    assert not worker_tracebacks(out + err), out + err


@pytest.mark.ray
def test_a_run_that_diverges_stops_with_status_diverged(ray_local, tiny_synth, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from reid_ray.cli.train import main

    assert main(_args(tmp_path, tiny_synth, "nan_from_step=1", "max_nonfinite_steps=3")) == 2
    out, err = capfd.readouterr()
    assert "training diverged: 3 non-finite losses in a row" in err and not worker_tracebacks(out + err), out + err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["status"] == "diverged"


# --------------------------------------------------------------------------- processes killed mid-run

@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.budget(100)  # a 2-trial sweep, SIGKILLed, then resumed: two drivers
def test_a_sweep_whose_driver_is_killed_resumes_without_rerunning_or_orphaning(ray_local, tiny_synth, tmp_path):
    """`python -m reid_ray.tune` on the running cluster (RAY_ADDRESS), SIGKILLed once its first trial has
    finished and its second has a checkpoint; `--resume` finishes the sweep. The first trial is not rerun,
    the second continues from its checkpoint, and MLflow holds one run per trial, none left RUNNING."""
    import subprocess
    import sys

    import ray
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "reid_ray.tune", "--method", "baseline", "--name", "s", "--output", str(out),
           "--mlflow-uri", uri, "--data-root", str(tiny_synth), "--num-samples", "2", "--max-concurrent", "1",
           "--scheduler", "none", "--epochs", "3", "--experiment", "sweep-faults",
           "--set", "num_identities=4", "--set", "pretrain_epochs=1", "--set", "checkpoint_upload=sync",
           "--set", "log_model=false"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def finished_trials() -> int:
        return sum('"epoch": 3' in p.read_text() for p in (out / "tune" / "s").glob("run_trial_*/result.json"))

    deadline = time.monotonic() + 600
    while not (finished_trials() >= 1 and any(0 < committed_epoch(d) < 3 for d in out.glob("s-*"))):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    (interrupted,) = [d.name for d in out.glob("s-*") if 0 < committed_epoch(d) < 3]  # its run's name
    first.kill()  # SIGKILL: the driver gets no chance to clean up
    first.wait()
    assert finished_trials() == 1

    second = subprocess.run([*cmd[:3], "--name", "s", "--output", str(out), "--resume"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-faults").experiment_id])
    trials = [r for r in runs if "trial_id" in r.data.tags]
    assert len(trials) == 2 and len({r.info.run_name for r in trials}) == 2, [r.info.run_name for r in trials]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    steps = {r.info.run_name: [m.step for m in client.get_metric_history(r.info.run_id, "epoch")] for r in trials}
    # the finished trial logged 3 epochs once; the interrupted one did not start again from epoch 1
    assert all(s.count(1) == 1 and max(s) == 3 for s in steps.values()), steps
    # ... and the interrupted trial ends where an uninterrupted run of its config ends (trained in one go here)
    import copy

    from reid_ray.config import apply_overrides
    from reid_ray.config.search_space import load_search_space
    from reid_ray.config.sweep import Sweep
    from reid_ray.distributed.driver import run_training

    sweep = Sweep.load(out / "tune" / "s")
    (trial,) = [r for r in trials if r.info.run_name == interrupted]
    swept = load_search_space(sweep.space_path, sweep.base).params
    cfg = apply_overrides(copy.deepcopy(sweep.base), {k: trial.data.params[k] for k in swept})
    cfg.name, cfg.output, cfg.experiment = "twin", str(tmp_path / "twin"), "sweep-faults-twin"
    twin = run_training(cfg)["metrics"]["target_mAP"]
    final = max(client.get_metric_history(trial.info.run_id, "target_mAP"), key=lambda m: (m.step, m.timestamp))
    assert final.step == 3 and abs(final.value - twin) < 1e-6, (final, twin)


_WRITER = """
import sys, torch
from reid_ray import atomic_path
path, version = sys.argv[1], 0
while True:
    version += 1
    with atomic_path(path) as tmp:
        torch.save({"version": version, "payload": torch.full((4_000_000,), float(version))}, tmp)
"""


def test_a_writer_killed_mid_write_leaves_the_old_file_or_the_new_one(tmp_path):
    """`atomic_path` (checkpoints, best.pt, plots; write_text_atomic for manifests, reports, configs): a writer
    SIGKILLed at random points never leaves half a file under the real name."""
    import random
    import subprocess
    import sys

    target = tmp_path / "best.pt"
    rng = random.Random(0)
    versions = []
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)])
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside a write
        proc.kill()
        proc.wait()
        state = torch.load(target, weights_only=True)  # whole, or this raises
        assert torch.equal(state["payload"], torch.full((4_000_000,), float(state["version"])))
        versions.append(state["version"])
    assert max(versions) > 1  # the kills did land after the first complete write
