"""A Ray node lost mid-run, on a local two-node cluster (`ray.cluster_utils.Cluster`, as Ray's own fault
tests use): the run's two workers sit one on each node; the second node goes away mid-run and comes
back. Ray Train is not configured elastic here: the worker group waits for its resources to return,
then resumes from the last checkpoint (docs/troubleshooting.md, "What survives what")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_helpers import committed_epoch, fault_record

pytestmark = [pytest.mark.ray, pytest.mark.faults]


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, second
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.budget(90)  # a two-node cluster's start, a 6-epoch run and its restart
def test_a_lost_node_costs_a_restart_not_the_run(two_nodes, tiny_synth, tmp_path):
    """The run's driver is `python -m reid_ray.train` on the cluster (RAY_ADDRESS), as a user runs it: a
    driver that outlives the test is killed with it, and what it printed is the failure's message."""
    import ray
    from mlflow.tracking import MlflowClient

    cluster, second = two_nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "reid_ray.train", "--method", "baseline", "--data-root", str(tiny_synth),
           "--output", str(tmp_path / "out"), "--epochs", "6", "--eval-every", "6", "--workers", "2",
           "--name", "lost", "--experiment", "lost-node", "--mlflow-uri", uri,
           "--set", "num_identities=4", "--set", "warmup_epochs=1", "--set", "checkpoint_upload=sync",
           "--set", "log_model=false"]
    log_path = tmp_path / "driver.log"
    session = Path(ray._private.worker._global_node.get_session_dir_path())

    def why(title: str) -> str:
        return f"{log_path.read_text(errors='replace')[-3000:]}\n{fault_record(session, title)}"

    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while committed_epoch(tmp_path / "out" / "lost") < 2:
            assert driver.poll() is None and time.monotonic() < deadline, why("before the node was lost")
            time.sleep(0.05)
        lost_after = committed_epoch(tmp_path / "out" / "lost")
        cluster.remove_node(second)  # its raylet and the worker on it die
        time.sleep(5)
        cluster.add_node(num_cpus=1)  # resources come back: the worker group can start again
        try:
            rc = driver.wait(timeout=400)
        except subprocess.TimeoutExpired:
            pytest.fail(why("the run did not end within 400 s of the node's return"))
    finally:
        driver.kill()
        driver.wait()
    assert rc == 0, why(f"the run failed (exit code {rc})")
    assert 2 <= lost_after < 6, lost_after
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("lost-node").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "lost"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert max(steps) == 6 and steps.count(1) == 1, steps  # resumed from a checkpoint, not from scratch
