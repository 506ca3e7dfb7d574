"""A Ray node lost mid-run, on a local two-node cluster (`ray.cluster_utils.Cluster`, as Ray's own fault
tests use): the run's two workers sit one on each node; the second node goes away mid-run and comes
back. Ray Train is not configured elastic here: the worker group waits for its resources to return,
then resumes from the last checkpoint (docs/troubleshooting.md, "What survives what")."""

from __future__ import annotations

import threading
import time

import pytest

from tests.ray_helpers import committed_epoch

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


def test_a_lost_node_costs_a_restart_not_the_run(two_nodes, tiny_synth, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from reid_ray.config import resolve_config
    from reid_ray.distributed.driver import run_training

    cluster, second = two_nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = resolve_config("baseline", sets=["num_identities=4", "warmup_epochs=1", "checkpoint_upload=sync", "log_model=false"],
                         flags=dict(data_root=str(tiny_synth), output=str(tmp_path / "out"), epochs=6, eval_every=6,
                                    workers=2, name="lost", mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    events, result = {}, {}
    # the run in a thread: Ray's Cluster.add_node installs signal handlers, which only the main thread may
    thread = threading.Thread(target=lambda: result.update(out=run_training(cfg)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while committed_epoch(tmp_path / "out" / "lost") < 2 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    events["lost_after_epoch"] = committed_epoch(tmp_path / "out" / "lost")
    cluster.remove_node(second)  # its raylet and the worker on it die
    time.sleep(5)
    cluster.add_node(num_cpus=1)  # resources come back: the worker group can start again
    events["returned"] = True
    thread.join(300)
    out = result["out"]
    assert events.get("returned") and 2 <= events["lost_after_epoch"] < 6, events
    assert out["metrics"]["epoch"] == 6
    client = MlflowClient(out["mlflow_uri"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert max(steps) == 6 and steps.count(1) == 1, steps  # resumed from a checkpoint, not from scratch
