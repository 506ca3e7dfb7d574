"""GPU resource plans on Ray's logical GPUs (no GPU needed): the plan fits, and its placement groups are
actually created on a cluster of exactly those resources. Also: the autoscaler request is withdrawn."""

import pytest

from reid_ray.distributed.resources import plan_resources

pytestmark = pytest.mark.ray


def _ready(plan, cluster_cpus: int, cluster_gpus: int, runs: int, workers: int, never: list | None = None) -> bool:
    """Start a Ray of exactly these resources and reserve `runs` × (worker group + the run's own bundles); the
    bundles of `never` must then find no room (their group stays pending)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address="local", num_cpus=cluster_cpus, num_gpus=cluster_gpus)
    try:
        groups = []
        for _ in range(runs):
            groups.append(placement_group([plan.worker] * workers))               # Ray Train's worker group
            groups.append(placement_group(plan.trial))                            # trial function + actor
        ok = all(ray.get(g.ready(), timeout=20) is not None for g in groups)
        for g in groups:
            remove_placement_group(g)
        if never:
            g = placement_group(never)
            ok = ok and not g.wait(timeout_seconds=2)
            remove_placement_group(g)
        return ok
    finally:
        ray.shutdown()


@pytest.mark.parametrize("gpus, cpus, workers, per_worker, concurrent, worker_gpu, actor_gpu", [
    (1, 8, 1, 1.0, 1, 0.75, 0.25),   # 1 GPU, 1 worker: it asks for 0.75, the actor's 0.25 beside it
    (1, 8, 2, 0.5, 1, 0.5, 0.0),     # 1 GPU, 2 workers of 0.5 fill it: the actor clusters on its CPU
    (2, 16, 2, 1.0, 1, 0.75, 0.25),  # 2 GPUs, 2 workers: 0.75 each, one GPU each
    (8, 64, 8, 1.0, 1, 0.75, 0.25),  # 8 GPUs, 8 workers: the same
    (8, 64, 2, 1.0, 3, 1.0, 0.25),   # 8 GPUs, a sweep of 2-worker trials: 3 × (2 + 0.25) GPUs, whole-GPU workers
])
def test_gpu_plans_fit_and_their_placement_groups_are_created(gpus, cpus, workers, per_worker, concurrent,
                                                              worker_gpu, actor_gpu):
    plan = plan_resources({"CPU": cpus, "GPU": gpus}, workers, per_worker, uses_actor=True, cpu_per_gpu=cpus / gpus)
    assert plan.use_gpu and plan.concurrent == concurrent and plan.worker["GPU"] == worker_gpu
    assert plan.actor.get("num_gpus", 0) == actor_gpu and plan.trial[1].get("GPU", 0) == actor_gpu
    # 0.75-GPU workers: one more worker than there are GPUs would have to share one, which Ray never allows
    never = [{"GPU": worker_gpu}] * (gpus + 1) if worker_gpu == 0.75 else None
    assert _ready(plan, cpus, gpus, plan.concurrent, workers, never)


def test_one_gpu_tune_trial_and_train_plan_agree():
    train = plan_resources({"CPU": 8, "GPU": 1}, 1, 1.0, True, max_concurrent=1, workers_flag="--workers")
    tune = plan_resources({"CPU": 8, "GPU": 1}, 1, 1.0, True)
    assert train == tune and tune.concurrent == 1 and tune.actor == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert tune.worker["GPU"] == 0.75


def test_the_autoscaler_request_is_withdrawn_once_gpus_arrive_and_on_every_exit(monkeypatch):
    import ray
    import ray.autoscaler.sdk as sdk

    from reid_ray.distributed import runtime

    calls, gpus = [], iter([0, 0, 1, 2, 2])  # the cluster as the wait polls it: GPU nodes join after two polls
    monkeypatch.setattr(sdk, "request_resources", lambda bundles=None, **kw: calls.append(bundles))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "GPU": next(gpus)})
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    assert runtime.wait_for_gpus(2, timeout_s=60) == {"CPU": 4, "GPU": 2}
    assert calls == [[{"GPU": 1}, {"GPU": 1}], []]  # asked, then withdrawn before the run starts
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "GPU": 0})
    assert runtime.wait_for_gpus(1, timeout_s=0.01)["GPU"] == 0  # none came: withdrawn, the plan then says so
    assert calls[-1] == [] and len(calls) == 4

    def interrupted(s):
        raise KeyboardInterrupt
    monkeypatch.setattr(runtime.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runtime.wait_for_gpus(1, timeout_s=60)
    assert calls[-1] == [] and len(calls) == 6
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "GPU": 2})
    runtime.wait_for_gpus(2, timeout_s=60)  # already there: nothing asked, nothing to withdraw
    assert len(calls) == 6


@pytest.mark.parametrize("runs, workers, uses_actor, gpus", [
    (1, 1, True, 1),   # one GPU, not 1.25 rounded up to 2: a 0.75 worker and the actor's 0.25
    (1, 8, True, 8),   # the same on 8 GPUs
    (1, 2, True, 2),
    (3, 2, True, 7),   # 3 × (2 + 0.25): the plan gives each actor its share once it fits
    (3, 2, False, 6),
    (2, 1, True, 3),   # on 2 GPUs the plan would run 1 trial (1.25 each), so 3
])
def test_the_gpus_asked_for_are_the_fewest_on_which_the_plan_runs_them(runs, workers, uses_actor, gpus):
    from reid_ray.distributed.resources import gpus_needed

    assert gpus_needed(runs, workers, 1.0, uses_actor) == gpus
    assert plan_resources({"CPU": 64, "GPU": gpus}, workers, 1.0, uses_actor).concurrent >= runs
    if gpus > runs * workers:
        assert plan_resources({"CPU": 64, "GPU": gpus - 1}, workers, 1.0, uses_actor).concurrent < runs
    assert gpus_needed(runs, workers, 0.0, uses_actor) == 0


def test_train_mmt_plans_and_starts_on_one_logical_gpu(tiny_synth, tmp_path):
    """`python -m reid_ray.train --method mmt --workers 1` on a one-GPU cluster: Ray Train accepts the worker's
    0.75 GPU, the PseudoLabeler has the other 0.25, and the worker group starts (once, 1.25 GPUs were wanted
    and it waited forever). Without a real GPU the started workers stop at their NCCL process group."""
    import ray
    import ray.util.state
    import torch

    from reid_ray.config import resolve_config
    from reid_ray.distributed.driver import run_training
    from reid_ray.models.reid_net import ModelConfig, build_reid_net

    init = tmp_path / "source.pt"  # a stand-in source model, as a baseline's checkpoint.pt holds it
    torch.save({"method": {"models": {"net": build_reid_net(ModelConfig(arch="small"), 12).state_dict()}}}, init)
    cfg = resolve_config("mmt", sets=["num_identities=4", "num_clusters=6", "iters=2", "two_sources=false", "log_model=false",
                                      "use_gpu=true", "max_failures=0"],
                         flags=dict(data_root=str(tiny_synth), output=str(tmp_path / "out"), workers=1, epochs=1,
                                    mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", init=[str(init)]))
    from reid_ray.distributed.runtime import _free_port

    port = _free_port()  # this Ray's own state API: another local Ray may be running (as init_ray does)
    api = f"http://127.0.0.1:{port}"
    ctx = ray.init(address="local", num_cpus=4, num_gpus=1, dashboard_port=port,
                   runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}})
    # the dashboard's address as Ray reports it: the free port can be taken by one of Ray's own gRPC servers
    # between _free_port and the dashboard's start (seen once: the state query read an HTTP/2 frame)
    api = f"http://{ctx.dashboard_url}" if ctx.dashboard_url else api
    try:
        if torch.cuda.is_available():  # a real GPU: the run trains
            run_training(cfg)
        else:
            with pytest.raises(Exception) as err:
                run_training(cfg)
            text = str(err.value)
            # the worker group was placed and started: it stops where it first needs a real GPU (NCCL or CUDA)
            assert any(word in text for word in ("NCCL", "CUDA", "NVIDIA", "cuda")), text[-2000:]
        actors = ray.util.state.list_actors(address=api, detail=True)
        labelers = [a for a in actors if a.class_name == "_PseudoLabeler"]
        assert labelers and all(a.required_resources.get("GPU", 0) == 0.25 for a in labelers)  # beside the worker
        workers = [a for a in actors if a.class_name == "RayTrainWorker"]  # in its placement group: GPU_group_<id>
        assert workers and all({v for k, v in a.required_resources.items() if k.startswith("GPU")} == {0.75}
                               for a in workers), [a.required_resources for a in workers]
    finally:
        ray.shutdown()
