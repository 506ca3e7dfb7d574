"""MMT, ECN and MAR end to end under Ray Train on two workers, and the same runs with processes SIGKILLed
mid-run: each killed run must end exactly as its uninterrupted twin.

One uninterrupted ("calm") run per method serves both the end-to-end test and, as the reference, the kill
test (one run instead of two: the suite's time goes to Ray's fixed cost per run, not to training).

- A Train worker is SIGKILLed mid-epoch 3. Ray Train restarts the group from epoch 2's checkpoint, which
  holds the whole method state (MMT's mean nets and pseudo-labels, ECN's exemplar memory, MAR's multilabel
  memory and agents, optimiser, scheduler, sampler epoch, torch/numpy/python RNGs).
- In the MMT run the PseudoLabeler actor is also SIGKILLed *during* epoch 2's refresh, once every rank has
  sent its shard: Ray restarts it, the shards are gone, every rank resends and the refresh is retried.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch.distributed as dist

from reid_ray.config import resolve_config
from reid_ray.distributed.actor import ActorClusterer
from reid_ray.methods import register_method
from reid_ray.methods.mmt import MMT
from tests.ray_helpers import RECORDS, committed_epoch, failure_decisions, fault_record

# `faults` for the whole module: its end-to-end tests are the uninterrupted twins of its kill tests, so
# `-m "not faults"` skips both rather than running the calm runs twice
pytestmark = [pytest.mark.ray, pytest.mark.faults]

SETS = {
    "mmt": ["num_clusters=10", "iters=12"],
    "ecn": ["target_batch=16", "iters=6", "features=32", "neighbour_start_epoch=1"],
    "mar": [],
}
EXTRA_FAILURES = 2  # worker-group failures tolerated beyond the one a kill test causes (see _killed_run)
COMPARED = {"mmt": ("target_mAP", "loss", "soft_ce", "pseudo_nmi"),
            "ecn": ("target_mAP", "loss", "exemplar", "camera"),
            "mar": ("target_mAP", "loss", "mdl", "cml")}


class _KillsTheActorMidRefresh(ActorClusterer):
    """Rank 0 SIGKILLs the actor's process once, in epoch 1's refresh (the run's 2nd epoch), after every
    rank's shard is in and before its own request for the result. The marker file keeps a restarted worker
    group from killing it again."""

    def __init__(self, handle, marker: Path):
        super().__init__(handle)
        self.marker = marker

    def _cluster(self, epoch, world):
        if epoch == 1 and dist.get_rank() == 0 and not self.marker.exists():
            pid = ray.get(self.handle.__ray_call__.remote(lambda actor: os.getpid()))
            self.marker.write_text(str(pid))
            os.kill(pid, signal.SIGKILL)
        return super()._cluster(epoch, world)


@register_method
class MMTWithAnActorKill(MMT):
    """MMT itself (same parameters, same computation), whose actor is killed mid-refresh."""

    name = "mmt-actor-kill"

    def on_epoch_start(self, ctx):
        if type(self.clusterer) is ActorClusterer:
            self.clusterer = _KillsTheActorMidRefresh(self.clusterer.handle, Path(self.cfg.output) / "actor-killed")
        super().on_epoch_start(ctx)


class Runs:
    """The module's runs: one output folder (the source models are pretrained once) and one MLflow store."""

    def __init__(self, data: Path, out: Path):
        self.data, self.out, self.calm_runs = data, out, {}
        self.uri = f"sqlite:///{out / 'mlflow.db'}"

    def cfg(self, method: str, name: str, base: str | None = None, max_failures: int = 2):
        return resolve_config(method, sets=["num_identities=4", "pretrain_epochs=1", "log_model=false",
                                            f"max_failures={max_failures}",
                                            "checkpoint_upload=sync", *SETS[base or method]],
                              flags=dict(data_root=str(self.data), output=str(self.out), epochs=3, eval_every=3,
                                         name=name, mlflow_uri=self.uri))

    def calm(self, method: str) -> dict:
        from reid_ray.distributed.driver import run_training

        if method not in self.calm_runs:
            self.calm_runs[method] = run_training(self.cfg(method, f"calm-{method}"))
        return self.calm_runs[method]


@pytest.fixture(scope="module")
def runs(ray_local, tiny_synth, tmp_path_factory):
    return Runs(tiny_synth, tmp_path_factory.mktemp("runs"))


# --------------------------------------------------------------------------- end to end (the calm runs)

@pytest.mark.budget(100)  # MMT's two source models pretrained under Ray first (cached for the module)
def test_mmt_end_to_end_with_the_actor_on_two_workers(runs):
    m = runs.calm("mmt")["metrics"]
    # labels identical on both ranks (checked by checksum in every refresh), quality and timings logged
    assert m["epoch"] == 3 and m["pseudo_labels_checksum_ok"] == 1 and 0 <= m["pseudo_nmi"] <= 1
    assert {"pseudo_cluster_time", "pseudo_gather_time", "refresh_time", "soft_ce", "soft_triplet"} <= set(m)
    assert m["target_mAP"] == m["target_mAP_mean_net1"]  # mean net 1, not the better of the two on test labels
    # the two source models (seed, seed + 1: one per net) were trained once and cached for every later run
    assert len(list((runs.out / "pretrain").glob("baseline-*.pt"))) == 2


def test_ecn_end_to_end_under_ray_on_two_workers(runs):
    m = runs.calm("ecn")["metrics"]
    assert m["epoch"] == 3 and 0 <= m["target_mAP"] <= 100 and "source_mAP" in m
    assert all(np.isfinite(m[k]) for k in ("loss", "ce", "exemplar", "camera", "target_loss"))


def test_mar_end_to_end_on_two_workers(runs):
    m = runs.calm("mar")["metrics"]
    for key in ("loss", "mdl", "cml", "al", "rj", "mdl_pos_pairs", "mdl_threshold", "target_mAP", "target_R1"):
        assert key in m, key
    assert m["epoch"] == 3 and 0 <= m["target_mAP"] <= 100 and math.isfinite(m["loss"])


# --------------------------------------------------------------------------- the same runs, killed

def _children_of_this_ray() -> list[tuple[int, str]]:
    """(pid, process title) of every worker process of the Ray this test started (not another Ray on
    the machine): the raylet's children."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == raylet:
            found.append((int(d.name), title))
    return found


def _kill_a_worker_in_epoch_3(run_dir: Path, killed: dict) -> threading.Thread:
    """SIGKILL a Train worker as soon as epoch 2's checkpoint is committed: the group is then in epoch 3."""
    def chaos():
        deadline = time.monotonic() + 600
        while committed_epoch(run_dir) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = next(pid for pid, t in _children_of_this_ray() if t.startswith("ray::RayTrainWorker"))
        os.kill(pid, signal.SIGKILL)
        killed["worker"] = pid

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    return thread


def _killed_run(runs: Runs, method: str, base: str) -> tuple[dict, dict]:
    """The killed twin, with room for `EXTRA_FAILURES` group failures beyond the one the test causes: a
    2-core CI machine once saw two more (cause unknown: CI keeps no Ray logs). Any failure beyond the test's
    own, and any run that fails, prints Ray's record of its deaths at the end of the pytest run."""
    from reid_ray.distributed.driver import run_training

    killed: dict = {}
    name = f"killed-{method}"
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    before = len(failure_decisions(session))
    thread = _kill_a_worker_in_epoch_3(runs.out / name, killed)
    try:
        out = run_training(runs.cfg(method, name, base=base, max_failures=1 + EXTRA_FAILURES))
    except BaseException:
        RECORDS.append(fault_record(session, f"{name}: the run failed"))
        raise
    thread.join(30)
    failures = len(failure_decisions(session)) - before
    if failures != 1:
        RECORDS.append(fault_record(session, f"{name}: {failures} worker-group failures where the test caused 1"))
    assert "worker" in killed, "the run ended before its worker could be killed"
    return out, killed


def _same_as_calm(out: dict, calm: dict, method: str) -> None:
    m, c = out["metrics"], calm["metrics"]
    assert m["epoch"] == 3
    for key in COMPARED[method]:
        assert m[key] == pytest.approx(c[key], rel=1e-6, abs=1e-6), (key, m[key], c[key])


def _history(out: dict, key: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    steps: dict[int, list[float]] = {}
    for h in MlflowClient(out["mlflow_uri"]).get_metric_history(out["mlflow_run_id"], key):
        steps.setdefault(h.step, []).append(h.value)
    return steps


@pytest.mark.budget(90)  # a restarted actor and a restarted worker group
def test_mmt_survives_its_actor_killed_mid_refresh_and_a_killed_worker_and_ends_as_if_uninterrupted(runs):
    calm = runs.calm("mmt")
    out, killed = _killed_run(runs, "mmt-actor-kill", "mmt")
    assert (runs.out / "actor-killed").is_file()  # the actor was killed in epoch 2's refresh
    m = out["metrics"]
    assert m["pseudo_labels_checksum_ok"] == 1  # every rank trained on the same, whole labels
    _same_as_calm(out, calm, "mmt")
    # epoch 2's refresh met the restarted actor: its shards were resent and the refresh retried
    attempts = _history(out, "pseudo_refresh_attempts")
    assert max(attempts[2]) >= 2 and attempts[1] == [1.0], attempts
    # epoch 3 ran twice (before and after the worker kill): its rows in MLflow are those of the replay
    assert _history(out, "epoch").keys() == {1, 2, 3}


@pytest.mark.parametrize("method", ["ecn", "mar"])
def test_a_killed_worker_resumes_the_memories_and_ends_as_if_uninterrupted(runs, method):
    """ECN's exemplar memory and MAR's multilabel memory and agents come back from the checkpoint."""
    calm = runs.calm(method)
    out, _ = _killed_run(runs, method, method)
    _same_as_calm(out, calm, method)
