"""GPU resource plans on Ray's logical GPUs (no GPU needed): the plan fits, and its placement groups are
actually created on a cluster of exactly those resources. Also: the autoscaler request is withdrawn."""

import pytest

from reid_ray.distributed.resources import plan_resources

pytestmark = pytest.mark.ray


def _ready(plan, cluster_cpus: int, cluster_gpus: int, runs: int, workers: int) -> bool:
    """Start a Ray of exactly these resources and reserve `runs` × (worker group + the run's own bundles)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(num_cpus=cluster_cpus, num_gpus=cluster_gpus)
    try:
        groups = []
        for _ in range(runs):
            groups.append(placement_group([plan.worker] * workers))               # Ray Train's worker group
            groups.append(placement_group(plan.trial))                            # trial function + actor
        ok = all(ray.get(g.ready(), timeout=20) is not None for g in groups)
        for g in groups:
            remove_placement_group(g)
        return ok
    finally:
        ray.shutdown()


@pytest.mark.parametrize("gpus, cpus, workers, concurrent", [
    (1, 8, 1, 1),     # one GPU, one worker: the actor cannot have a GPU share and clusters on its CPU
    (2, 16, 2, 1),    # two GPUs, two workers: the same
    (8, 64, 2, 3),    # 8 GPUs, a sweep of 2-worker trials: 3 × (2 + 0.25) GPUs
])
def test_gpu_plans_fit_and_their_placement_groups_are_created(gpus, cpus, workers, concurrent):
    plan = plan_resources({"CPU": cpus, "GPU": gpus}, workers, 1.0, uses_actor=True, cpu_per_gpu=cpus / gpus)
    assert plan.use_gpu and plan.concurrent == concurrent and plan.worker["GPU"] == 1
    assert plan.actor.get("num_gpus", 0) == (0.25 if gpus > workers else 0)
    assert _ready(plan, cpus, gpus, plan.concurrent, workers)


def test_one_gpu_tune_trial_and_train_plan_agree():
    train = plan_resources({"CPU": 8, "GPU": 1}, 1, 1.0, True, max_concurrent=1, workers_flag="--workers")
    tune = plan_resources({"CPU": 8, "GPU": 1}, 1, 1.0, True)
    assert train == tune and tune.concurrent == 1 and tune.actor == {"num_cpus": 1.0}
    assert _ready(tune, 8, 1, 1, 1)


def test_the_autoscaler_request_is_withdrawn_on_every_exit(monkeypatch):
    import ray
    import ray.autoscaler.sdk as sdk

    from reid_ray.distributed import runtime

    calls = []
    monkeypatch.setattr(sdk, "request_resources", lambda bundles=None, **kw: calls.append(bundles))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "GPU": 0})
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    with runtime.gpus_requested(2, timeout_s=0.01):
        assert calls == [[{"GPU": 1}, {"GPU": 1}]]
    assert calls[-1] == []
    with pytest.raises(RuntimeError), runtime.gpus_requested(1, timeout_s=0.01):
        raise RuntimeError("the run failed")
    assert calls[-1] == [] and len(calls) == 4
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "GPU": 2})
    with runtime.gpus_requested(2, timeout_s=60):  # already there: nothing asked, nothing to withdraw
        pass
    assert len(calls) == 4
