"""End-to-end under Ray Train on a tiny synthetic benchmark (one shared local Ray)."""

import time
from pathlib import Path

import pytest
import torch

from reid_ray.cli.train import main
from reid_ray.config import from_dict, resolve_config
from reid_ray.data.synthetic import SynthConfig, generate_synthetic
from reid_ray.distributed.driver import run_training

pytestmark = pytest.mark.ray
SMALL = SynthConfig(train_ids=16, test_ids=10, images_per_id=(6, 8), cameras_per_id=(2, 3), num_cameras=3,
                    camstyle=False, texture=False)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, SMALL)
    return root


def test_trains_reports_checkpoints_tracks_and_resumes(ray_local, cli_training, capsys):
    """The CLI run of conftest (baseline, 4 epochs), then `--resume` from its checkpoint to a fifth epoch (in this
    process: the CLI's own process start is the fixture's)."""
    from mlflow.tracking import MlflowClient

    assert cli_training.proc.returncode == 0, cli_training.text
    client = MlflowClient(cli_training.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("synth-a->synth-b").experiment_id])
    m = run.data.metrics
    for key in ("loss", "ce", "triplet", "lr", "images_per_s", "epoch_time", "source_mAP", "target_mAP",
                "target_R1", "target_R5", "target_R10"):
        assert key in m, key
    assert m["epoch"] == 4 and 0 <= m["target_mAP"] <= 100
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "baseline"
    assert run.data.tags["selection_metric"] == "target_mAP"  # what best.pt ranked on, resolved
    assert run.data.params["optim.lr"] == "0.00035"
    assert len(client.get_metric_history(run.info.run_id, "target_mAP")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "cmc.png", "checkpoints"} <= artifacts
    (checkpoint,) = [line.split(" ", 1)[1] for line in cli_training.proc.stdout.splitlines()
                     if line.startswith("checkpoint ")]
    state = torch.load(f"{checkpoint}/checkpoint.pt", weights_only=False)
    assert state["epoch"] == 3 and {"method", "rng", "best"} <= set(state)
    # checkpoint_every=4: epochs 1-3 reported without a checkpoint, epoch 4 with one (and best.pt when it improved)
    assert [p.name for p in Path(checkpoint).parent.glob("checkpoint_*") if p.is_dir()] == [Path(checkpoint).name]
    assert (Path(checkpoint).parent / "best.pt").is_file()

    # --resume continues from the saved epoch: only epoch 5 runs (its checkpoint uploaded asynchronously); --name
    # beside it makes a new run (a new folder and MLflow run) from that checkpoint
    argv = [*cli_training.argv, "--epochs", "5", "--resume", checkpoint, "--name", "resumed",
            "--set", "checkpoint_upload=async"]
    assert main(argv[2:]) == 0
    printed = capsys.readouterr().out
    (again,) = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_name == "resumed"]
    assert [h.value for h in client.get_metric_history(again.info.run_id, "epoch")] == [5.0]
    (checkpoint,) = [line.split(" ", 1)[1] for line in printed.splitlines() if line.startswith("checkpoint ")]
    resumed_state = torch.load(f"{checkpoint}/checkpoint.pt", weights_only=False)
    assert resumed_state["epoch"] == 4 and from_dict(resumed_state["config"]).epochs == 5


def test_one_and_two_workers_agree_at_equal_global_batch(ray_local, cli_training, tmp_path):
    """The CLI run of conftest (2 workers) against the same run on 1 worker: the same global batch, the same BN
    statistics (GlobalBatchNorm) and the same triplets (mined over the global batch) give the same model."""
    from mlflow.tracking import MlflowClient

    from reid_ray.cli.train import build_parser, config_from_args

    argv = [*cli_training.argv[2:], "--workers", "1", "--name", "one-worker", "--output", str(tmp_path / "out"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.workers == 1 and resolve_config("baseline").workers == 2  # the CLI run's: the default
    one = run_training(cfg)["metrics"]["target_mAP"]
    client = MlflowClient(cli_training.uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("synth-a->synth-b").experiment_id])
              if r.info.run_name == "quiet"]
    two = [h.value for h in client.get_metric_history(run.info.run_id, "target_mAP")][-1]
    assert abs(one - two) <= 1.0, (one, two)


def test_user_errors_exit_2_without_traceback(ray_local, data_root, tmp_path, capsys):
    # P=16 divides over 4 workers (an uneven P is caught earlier, before Ray); 4 CPU workers do not fit 2 CPUs
    assert main(["--workers", "4", "--data-root", str(data_root), "--output", str(tmp_path)]) == 2
    assert "4 CPU workers requested" in capsys.readouterr().err
    assert main(["--method", "nope"]) == 2
    assert "valid: baseline" in capsys.readouterr().err
    assert main(["--set", "nonsense=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_pseudo_labeler_actor_clusters_and_survives_a_restart(ray_local):
    import numpy as np
    import ray

    from reid_ray.clustering.client import ClusterSpec
    from reid_ray.distributed.actor import ActorClusterer, create_pseudo_labeler

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 200)
    feats = (rng.normal(size=(5, 8)) * 10)[truth] + rng.normal(size=(200, 8))
    handle = create_pseudo_labeler(ClusterSpec(num_clusters=5, nredo=5), truth)
    client = ActorClusterer(handle)
    first = client.refresh(feats.astype(np.float32), epoch=0)
    assert len(first.labels) == 200 and first.stats["nmi"] > 0.8 and first.stats["labels_checksum_ok"] == 1
    ray.kill(handle, no_restart=False)  # the actor process dies; Ray restarts it
    again = client.refresh(feats.astype(np.float32), epoch=1)
    assert len(again.labels) == 200 and again.stats["refresh_attempts"] >= 1
    ray.kill(handle)


@pytest.mark.parametrize("user, workers", [
    ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"GOMP_SPINCOUNT": "10000"}, {"GOMP_SPINCOUNT": "10000"}),  # a short spin, not PASSIVE on top of it
    ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5"}),
])
def test_the_workers_get_the_users_openmp_wait_settings_or_passive(monkeypatch, user, workers):
    from reid_ray.distributed.runtime import omp_env

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in user.items():
        monkeypatch.setenv(key, value)
    assert omp_env() == workers


@pytest.mark.ray
def test_ray_processes_get_the_wait_policy_and_api_server_and_the_driver_keeps_its_environment(ray_local):
    """init_ray hands its variables to Ray's processes through the raylet's environment (no job runtime_env):
    a worker sees them, the calling process's own environment is as it was, except for what ray.init itself
    writes there: Ray's authentication mode (RAY_AUTH_MODE=token for a new local Ray since Ray 2.60), which a
    driver started from this process with RAY_ADDRESS needs to be let in."""
    import os

    import ray

    @ray.remote(num_cpus=0.1)
    def seen() -> dict:
        return {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "RAY_API_SERVER_ADDRESS",
                                               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_AUTH_MODE")}

    env = ray.get(seen.remote())
    assert env["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert (env["RAY_API_SERVER_ADDRESS"] or "").startswith("http://127.0.0.1:")
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    assert os.environ.get("RAY_AUTH_MODE") == env["RAY_AUTH_MODE"]
    assert not ray.get_runtime_context().runtime_env.env_vars()


@pytest.mark.ray
def test_placement_groups_that_ended_jobs_left_are_released_and_no_other(ray_local, monkeypatch, capsys):
    """A placement group whose job has ended and whose creator is gone (Ray registered it after the job's
    teardown: a stopped sweep's controller asking for its next worker group) is removed when a driver joins the
    cluster; a running job's, a live actor's and a detached one are kept. Real groups on the real GCS, made by
    this test's driver and by an actor; only the job's end is the state API's answer made up."""
    from types import SimpleNamespace

    import ray
    import ray.util.state
    from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

    from reid_ray.distributed import runtime

    @ray.remote(num_cpus=0)
    class Maker:
        def make(self) -> str:
            pg = placement_group([{"CPU": 0.25}])
            ray.get(pg.ready())
            return pg.id.hex()

    def state(hex_id: str) -> str:
        return placement_group_table(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))["state"]

    mine = placement_group([{"CPU": 0.25}])
    ray.get(mine.ready())
    maker = Maker.remote()
    theirs = ray.get(maker.make.remote())
    assert runtime.release_orphaned_placement_groups() == []  # the cluster answered; its job runs
    me = ray.get_runtime_context().get_job_id()
    monkeypatch.setattr(ray.util.state, "list_jobs", lambda **_: [SimpleNamespace(job_id=me, status="STOPPED")])
    # the job ended: the driver's group goes, the live actor's stays
    released = runtime.release_orphaned_placement_groups()
    assert mine.id.hex() in released and theirs not in released
    assert "placement group(s) that ended jobs left on the cluster (" in capsys.readouterr().out
    assert state(theirs) == "CREATED"
    ray.kill(maker)  # its creator dead, its job (really) running: the GCS keeps it; for an ended job it is an orphan
    deadline = time.monotonic() + 10
    while theirs not in runtime.release_orphaned_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.2)
    for hex_id in (mine.id.hex(), theirs):
        while state(hex_id) != "REMOVED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state(hex_id) == "REMOVED"

    def group(job: str, state: str = "CREATED", detached: bool = False, actor: str | None = None):
        return SimpleNamespace(creator_job_id=job, state=state, is_detached=detached, creator_actor_id=actor)

    groups = [group("01"), group("02"), group("02", detached=True), group("02", state="REMOVED"), group("03"),
              group("03", actor="a1"), group("03", actor="a2")]
    assert [(g.creator_job_id, g.creator_actor_id) for g in runtime.orphaned_placement_groups(
        groups, {"02", "03"}, {"a1"})] == [("02", None), ("03", None), ("03", "a2")]
