"""One resource planner for `train` and `tune`: each Ray Train worker's share, the pseudo-label
actor's, and (in a sweep) how many trials run at once. Pure arithmetic over `ray.cluster_resources()`
and `ray.nodes()` (passed in), so it is tested without Ray.

    plan = plan_resources({"CPU": 64, "GPU": 8}, workers=2, gpus_per_worker=1, uses_actor=True)
    plan.concurrent, plan.worker      # 3 trials at once, {"CPU": ..., "GPU": 1} per worker

The arithmetic (docs/scale-out.md has a worked 8-GPU example):
- budget = the cluster's CPUs / concurrent runs. Of each budget, 0.1 CPU is kept for the run's
  driver side (a Tune trial's function, which only waits on its TorchTrainer; Ray Train's controller),
  the actor takes 5 % on a CPU cluster (it clusters while the workers wait) or 1 CPU beside a
  GPU share, and the workers split the rest, rounded down to 0.01 CPU.
- GPU runs: a run needs workers × gpus_per_worker GPUs plus the actor's 0.25. Where the workers of one
  GPU each take every GPU (1 GPU and 1 worker, 8 GPUs and 8 workers), each worker asks Ray for
  1 - 0.25 = 0.75 GPU instead: two such workers never share a GPU (0.75 + 0.75 > 1), so each still has
  one to itself, and the actor's 0.25 fits beside any of them (it clusters between epochs, while its
  run's workers wait at the barrier). Only fractional workers that fill the GPUs (2 × 0.5 on 1 GPU)
  leave the actor on its CPU (faiss-cpu k-means on a Market-sized target takes seconds). A GPU worker
  asks for at most the CPUs its GPU node has per GPU, less one for the actor, or it would fit on no node.
- CPU runs on 2 cores: 0.1 (driver side) + 0.1 (actor) + 2 × 0.9 (workers) = 2 (measured: a trial's default 1 CPU leaves 2 workers unplaced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from reid_ray import ReidRayError

DRIVER_CPU = 0.1        # per run: a Tune trial's function, or Ray Train's controller side
ACTOR_GPU = 0.25        # the pseudo-label actor's GPU share


@dataclass
class ResourcePlan:
    use_gpu: bool
    concurrent: int                                 # runs (Tune trials) at once
    worker: dict[str, float]                        # Ray Train's resources_per_worker
    threads: int                                    # torch threads per worker
    actor: dict[str, float] = field(default_factory=dict)  # the PseudoLabeler's ray options ({}: no actor)
    actor_threads: int = 1                          # its faiss threads
    trial: list[dict[str, float]] = field(default_factory=list)  # a Tune trial's placement-group bundles


def cpus_per_gpu(nodes: list[dict]) -> float:
    """The fewest CPUs per GPU on any live GPU node (`ray.nodes()`): a GPU worker asking for more fits on no node."""
    ratios = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in nodes
              if n.get("Alive", True) and n.get("Resources", {}).get("GPU", 0) > 0]
    return min(ratios) if ratios else math.inf


def _gpu_fit(gpus: float, workers: int, gpus_per_worker: float, uses_actor: bool) -> tuple[float, float, int]:
    """(each worker's GPU request, the actor's GPU share, how many runs fit) on `gpus` GPUs (module docstring)."""
    if uses_actor and workers * gpus_per_worker + ACTOR_GPU <= gpus + 1e-9:  # the 0.25 fits beside the workers
        return gpus_per_worker, ACTOR_GPU, int(gpus / (workers * gpus_per_worker + ACTOR_GPU) + 1e-9)
    if uses_actor and gpus_per_worker == 1:  # the workers take every GPU: 0.75 each, the actor beside one
        return 1 - ACTOR_GPU, ACTOR_GPU, int(gpus / workers + 1e-9)
    return gpus_per_worker, 0.0, int(gpus / (workers * gpus_per_worker) + 1e-9)


def gpus_needed(runs: int, workers: int, gpus_per_worker: float, uses_actor: bool) -> int:
    """The fewest whole GPUs on which `plan_resources` fits `runs` runs at once: what to ask the autoscaler
    for. The workers' GPUs, plus the actors' shares where they do not fit beside 0.75-GPU workers (one run
    of one worker needs 1 GPU: worker 0.75 + actor 0.25; 3 runs of 2 workers need 7: 3 × 2.25)."""
    if gpus_per_worker <= 0:
        return 0
    need = math.ceil(runs * workers * gpus_per_worker - 1e-9)
    while _gpu_fit(need, workers, gpus_per_worker, uses_actor)[2] < runs:
        need += 1
    return need


def plan_resources(cluster: dict, workers: int, gpus_per_worker: float, uses_actor: bool,
                   max_concurrent: int | None = None, cpu_per_gpu: float = math.inf,
                   workers_flag: str = "--workers-per-trial", cpu_flag: str = "--gpus-per-worker 0") -> ResourcePlan:
    """The plan for runs of `workers` Ray Train workers each (see the module docstring).

    `max_concurrent=1` plans a single run (`train`); `workers_flag` is the flag a user changes to fix a
    plan that does not fit (`--workers` for train), `cpu_flag` the one that trains on CPUs instead."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if workers < 1:
        raise ReidRayError(f"{workers} workers requested; pass {workers_flag} 1 or more")
    use_gpu = gpus_per_worker > 0
    worker_gpu, actor_gpu = gpus_per_worker, 0.0
    if use_gpu:
        if gpus < gpus_per_worker * workers:
            raise ReidRayError(f"{workers} GPU workers × {gpus_per_worker:g} GPU requested but the cluster has "
                               f"{gpus:g} GPUs; pass {workers_flag} {max(1, int(gpus // gpus_per_worker))}, "
                               f"{cpu_flag} for CPU training, or add GPU nodes")
        worker_gpu, actor_gpu, fit = _gpu_fit(gpus, workers, gpus_per_worker, uses_actor)
    else:
        if workers > cpus:
            raise ReidRayError(f"{workers} CPU workers requested but the cluster has {cpus:g} CPUs; "
                               f"pass {workers_flag} between 1 and {int(cpus)}")
        fit = max(1, int(cpus // (workers + 2 * DRIVER_CPU)))
    concurrent = min(fit, max_concurrent) if max_concurrent else fit
    budget = cpus / concurrent
    actor_cpu = (1.0 if use_gpu else round(0.05 * budget, 2)) if uses_actor else 0.0
    worker_cpu = math.floor((budget - DRIVER_CPU - actor_cpu) / workers * 100) / 100
    if use_gpu and math.isfinite(cpu_per_gpu):  # a GPU worker must fit on one GPU node, beside the actor's CPU
        worker_cpu = min(worker_cpu, max(1.0, math.floor(cpu_per_gpu * gpus_per_worker) - 1))
    if worker_cpu < (1 if use_gpu else 0.3):
        raise ReidRayError(f"{cpus:g} CPUs leave {worker_cpu:g} per worker for {concurrent} concurrent runs of "
                           f"{workers} workers; lower --max-concurrent or {workers_flag}")
    worker = {"CPU": worker_cpu, **({"GPU": worker_gpu} if use_gpu else {})}
    actor = {"num_cpus": actor_cpu, **({"num_gpus": actor_gpu} if actor_gpu else {})} if uses_actor else {}
    # a trial's actor lives in the trial's placement group, in a bundle of its own
    bundles = [{"CPU": DRIVER_CPU}] + ([{"CPU": actor_cpu, **({"GPU": actor_gpu} if actor_gpu else {})}]
                                       if uses_actor else [])
    return ResourcePlan(use_gpu=use_gpu, concurrent=concurrent, worker=worker, threads=max(1, round(worker_cpu)),
                        actor=actor, actor_threads=max(1, int(budget)), trial=bundles)
