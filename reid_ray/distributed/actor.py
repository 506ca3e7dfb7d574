"""The pseudo-label actor: one `PseudoLabeler` per training run (so one per Tune trial).

The driver creates it with the share `distributed/resources.py` plans (0.25 GPU beside
the workers on a GPU cluster, a CPU share otherwise; faiss and torch threads set to match,
as Ray actors start with OMP_NUM_THREADS=1) and passes its handle to the Ray Train
workers. At a refresh
every worker `ray.put`s the features of its shard and hands the reference to the
actor (the arrays never go through the driver); after a barrier, every worker
asks for the result of that epoch: the first request clusters, the others get
the cached result, so all ranks receive identical labels in dataset order.

With a GPU share the actor's process sees its GPU (Ray sets CUDA_VISIBLE_DEVICES), and
the run's `clustering.backend` (in the spec) clusters there: faiss's GPU build where it is
installed, else torch (`auto`, clustering/kmeans.py). Each result's stats say which engine
and device clustered (`cluster_with_torch`, `cluster_on_gpu`; `pseudo_...` in MLflow).

The actor is restarted by Ray if its process dies (`max_restarts`); a refresh
that finds its shards lost resends them and retries.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
import torch.distributed as dist

from reid_ray.clustering.client import (
    ClusterSpec,
    check_same_across_ranks,
    run_clustering,
)
from reid_ray.clustering.kmeans import ClusterResult


class _PseudoLabeler:
    def __init__(self, spec: ClusterSpec, threads: int = 1, truth=None, cameras=None):
        from reid_ray.clustering.kmeans import clustering_engine, faiss

        clustering_engine(spec.backend)  # no faiss and no GPU (or a bad backend): the error here, at the start
        if faiss is not None:  # the CPU path's threads (a GPU box may have torch only)
            faiss.omp_set_num_threads(max(1, threads))
        torch.set_num_threads(max(1, threads))
        self.spec, self.truth, self.cameras = spec, truth, cameras
        self.shards: dict[int, dict[int, np.ndarray]] = {}
        self.results: dict[int, ClusterResult] = {}

    def put_shard(self, epoch: int, rank: int, features: np.ndarray) -> int:
        self.shards.setdefault(epoch, {})[rank] = features  # a reference arg arrives as the array
        return len(features)

    def cluster(self, epoch: int, world_size: int) -> ClusterResult | None:
        if epoch not in self.results:
            shards = self.shards.get(epoch, {})
            if len(shards) < world_size:
                return None  # shards lost (the actor was restarted): the caller resends
            feats = np.concatenate([shards[r] for r in range(world_size)])
            self.results = {epoch: run_clustering(feats, self.spec, epoch, self.truth, self.cameras)}
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # the GPU is shared with a training worker: hand back the cached blocks
            self.shards.pop(epoch)
            self.shards = {e: s for e, s in self.shards.items() if e > epoch}
        return self.results[epoch]


PseudoLabeler = ray.remote(max_restarts=3, max_task_retries=3)(_PseudoLabeler)


def create_pseudo_labeler(spec: ClusterSpec, truth=None, cameras=None, resources: dict | None = None,
                          threads: int = 1):
    """The run's actor, with `resources` (Ray options) and `threads` (faiss) from the run's ResourcePlan."""
    return PseudoLabeler.options(**(resources or {"num_cpus": 0.1})).remote(spec, threads, truth, cameras)


class ActorClusterer:
    """The Ray-side `refresh` that methods call (see clustering/client.py)."""

    def __init__(self, handle, retries: int = 3):
        self.handle, self.retries = handle, retries
        self.last: ClusterResult | None = None  # the latest refresh (its picture: the worker logs it)

    def refresh(self, local_features: np.ndarray, epoch: int) -> ClusterResult:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for attempt in range(self.retries):
            t0 = time.perf_counter()
            ray.get(self.handle.put_shard.remote(epoch, rank, ray.put(np.ascontiguousarray(local_features))))
            if distributed:
                dist.barrier()
            t1 = time.perf_counter()
            res = self._cluster(epoch, world)
            ok = [res is not None]
            if distributed:  # retry together: a rank that got nothing makes every rank resend
                flags = [None] * world
                dist.all_gather_object(flags, ok[0])
                ok = flags
            if all(ok):
                res.stats.update({"gather_time": t1 - t0,
                                  "return_time": time.perf_counter() - t1 - res.stats.get("cluster_time", 0.0),
                                  "refresh_attempts": attempt + 1})
                check_same_across_ranks(res)
                self.last = res
                return res
        raise RuntimeError(f"pseudo-label refresh for epoch {epoch} failed {self.retries} times")

    def _cluster(self, epoch: int, world: int) -> ClusterResult | None:
        """The actor's clustering of `epoch`, once every rank's shard is in; None where the actor lost them
        (restarted: Ray retries the call on the new process, which has no shards)."""
        return ray.get(self.handle.cluster.remote(epoch, world))
