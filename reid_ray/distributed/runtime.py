"""Joining or starting Ray, and asking the autoscaler for GPUs."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from types import SimpleNamespace

import ray

from reid_ray import catch_stop_signals
from reid_ray.tracking import console


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (a job, a running cluster), or start a local Ray."""
    if ray.is_initialized():
        return
    # quiet (console.set_verbose): the workers' and Ray's output stays in Ray's session logs, off the console
    loud = console.verbose()
    quiet = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)  # resources belong to the cluster: passing any raises
        catch_stop_signals(again=True)
        release_orphaned_placement_groups()
        return

    # OpenMP threads that spin while they wait make every parallel region crawl as soon as another
    # process wants the core (Ray's daemons, the actor, a second worker): several times slower epochs on
    # 2 cores (bench/RESULTS.md, bench_omp_wait). Passive waiting costs nothing when the core is free.
    # Ray Train's placement-group cleaner (which frees the workers of a trial that Tune stops) finds
    # the cluster through the state API: with a second local Ray on the machine, "auto" is ambiguous
    # and the cleaner fails, so the next trial waits forever. Name this instance's API server for it.
    port = _free_port()
    env = {**omp_env(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **local_train_env()}
    # address="local": a new instance, even where a `ray start` cluster runs on this machine (plain ray.init()
    # would join that one); RAY_ADDRESS=auto joins it
    # The variables reach every Ray process through the environment of the raylet that ray.init spawns here, not
    # through a job runtime_env: a worker process started for a runtime_env cannot be one that Ray prestarted,
    # and that cost 3-4 s of a 60 s CLI run on 2 cores (bench/RESULTS.md, "The suite's time"). This process's own
    # values of these variables are given back as they were.
    with _environ(env):
        ray.init(address="local", dashboard_port=port, **quiet)
    catch_stop_signals(again=True)  # ray.init's own SIGTERM handler exits without a word: the CLI's again


def release_orphaned_placement_groups() -> list[str] | None:
    """Remove the placement groups that jobs which have ended left on the cluster, and say so in one line; the
    ids removed, or None where the cluster could not be asked.

    Ray removes a job's placement groups when the job ends, but one whose creation reaches the GCS just after
    that stays for good: a stopped sweep's Ray Train controller, seeing its workers die first, asks for its next
    worker group's placement group in the moment its job is torn down (seen after `ray job stop`: the GCS logged
    "Marking job as finished", then registered the job's new group 0.15 s later). Its CPUs stay reserved, so the
    `--resume` of that sweep waited for them forever. Ray Train's own cleaner only knows the groups of worker
    groups that started.

    Removed: a group of an ended job that is not detached and whose creator (the job's driver, or an actor) is no
    longer alive. A group that a live actor made (a detached actor outlives its job) is that actor's to keep.
    Jobs and actors come from Ray's state API (the dashboard of the cluster in RAY_ADDRESS), each call bounded
    to 5 s; where it cannot answer, nothing is removed."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors, list_jobs

    # this Ray's GCS address: without one the state API reads RAY_ADDRESS, else "auto", which can name another
    # Ray on the machine (RAY_ADDRESS and RAY_API_SERVER_ADDRESS, where set, still come first)
    ask = dict(address=ray.get_runtime_context().gcs_address, timeout=5, limit=10_000, raise_on_missing_output=False)
    try:
        ended = {j.job_id for j in list_jobs(**ask)
                 if j.job_id and str(getattr(j.status, "value", j.status)) in ("SUCCEEDED", "FAILED", "STOPPED")}
        groups = [g for g in _placement_groups() if g.creator_job_id in ended] if ended else []
        alive = {a.actor_id for a in list_actors(filters=[("state", "!=", "DEAD")], **ask)} if any(
            g.creator_actor_id for g in groups) else set()
    except Exception as e:  # the dashboard is down or unreachable (or a Ray Client): the cluster works without it
        logging.getLogger(__name__).debug("placement groups not checked: %s", e)
        return None
    removed, held = [], {}
    for pg in orphaned_placement_groups(groups, ended, alive):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg.placement_group_id))))
        except Exception as e:
            logging.getLogger(__name__).debug("placement group %s not removed: %s", pg.placement_group_id, e)
            continue
        removed.append(pg.placement_group_id)
        for bundle in pg.bundles:
            for key, value in bundle.items():
                held[key] = held.get(key, 0) + value
    if removed:
        what = ", ".join(f"{v:g} {k}" for k, v in sorted(held.items()) if k in ("CPU", "GPU")) or "no CPU or GPU"
        print(f"reid-ray: released {len(removed)} placement group(s) that ended jobs left on the cluster ({what})",
              flush=True)
    return removed


def orphaned_placement_groups(groups: list, ended_jobs: set[str], live_actors: set[str]) -> list:
    """Of the placement groups (`_placement_groups`), those whose job has ended, that Ray has not removed, not
    detached (made to outlive their job), and whose creator actor, where an actor made them, is not alive."""
    return [pg for pg in groups if pg.creator_job_id in ended_jobs and not pg.is_detached
            and pg.state != "REMOVED" and pg.creator_actor_id not in live_actors]


def _placement_groups() -> list[SimpleNamespace]:
    """The GCS's placement-group table, each group with the actor that made it (None: a driver or a task).

    Ray's state API (`list_placement_groups`) does not name a group's creator, which decides whether a group of
    an ended job is still someone's; the GCS table does. It is read here through Ray's GlobalState, the same
    accessor `ray.util.placement_group_table` reads, with the table's own protobuf (Ray is pinned to 2.60.*;
    tests/test_train_ray.py reads it on a real cluster, so a Ray that changes it fails there)."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    nil = ray.ActorID.nil().hex()
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        row = PlacementGroupTableData.FromString(raw)
        actor = row.creator_actor_id.hex()
        groups.append(SimpleNamespace(
            placement_group_id=row.placement_group_id.hex(), creator_job_id=row.creator_job_id.hex(),
            creator_actor_id=None if actor in ("", nil) else actor, is_detached=row.is_detached,
            state=PlacementGroupTableData.PlacementGroupState.Name(row.state),
            bundles=[dict(b.unit_resources) for b in row.bundles]))
    return groups


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """`values` in os.environ for the block, then each of those keys as it was. Only those keys:
    `unittest.mock.patch.dict` would give back the whole environment, and with it undo what `ray.init` itself
    writes there for this process and the processes it starts (Ray 2.60 turns on token authentication for a new
    local Ray with RAY_AUTH_MODE=token: without it, a `python -m reid_ray.tune` started from here with RAY_ADDRESS
    is refused by the cluster, InvalidAuthToken)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def omp_env() -> dict[str, str]:
    """The OpenMP wait settings Ray's workers get: the user's own OMP_WAIT_POLICY and GOMP_SPINCOUNT where
    set, else OMP_WAIT_POLICY=PASSIVE. A short spin before sleeping (GOMP_SPINCOUNT=10000, OMP_WAIT_POLICY
    unset) took 24 % off a 1-worker epoch on 2 cores and changed nothing measurable with 2 workers
    (bench/RESULTS.md, "Ray Train overhead"); an unbounded spin (ACTIVE) made the same epoch 7x slower."""
    mine = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if os.environ.get(k)}
    return mine or {"OMP_WAIT_POLICY": "PASSIVE"}


# How often Ray Train's controller polls its workers (Ray's default: 2 s). The end of the training function is
# seen two polls late (bench_ray_fixed_cost: 2.05 s at 2 s, 1.04 s at 0.5 s), and a failure at the next poll;
# 0.5 s took 5 s off a 2-epoch CLI run on 2 cores (bench/RESULTS.md, "Ray Train overhead"). The polls themselves
# are a few small actor calls. The user's own value is kept.
TRAIN_POLL_S = "0.5"


def local_train_env() -> dict[str, str]:
    """Ray Train's settings for a Ray that init_ray starts on this machine, where the user has not set them: no
    preemption watcher (an actor, so one more Python process per fit, that polls for nodes a cloud is about to
    take back: a local Ray has none)."""
    return {} if os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") else {
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def train_env_defaults() -> None:
    """Ray Train's settings, for the controller that the next `TorchTrainer.fit()` starts in this process
    (Ray Train passes these variables of the caller's environment on to it). A local Ray's processes have
    local_train_env's from the raylet's environment (init_ray)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_gpus(needed: float, timeout_s: float) -> dict:
    """Ask Ray's autoscaler for `needed` GPUs (a cluster may start with none), wait up to `timeout_s` for
    them, and withdraw the request as soon as they are there or the wait ends, however it ends (Ray keeps a
    `request_resources` until the next call, so a request left in place would keep GPU nodes up after the
    run). The run's own placement groups then hold what it uses. Returns the cluster's resources."""
    from ray.autoscaler.sdk import request_resources

    cluster = ray.cluster_resources()
    if cluster.get("GPU", 0) >= needed or timeout_s <= 0:
        return cluster
    print(f"waiting up to {timeout_s:.0f} s for the autoscaler to add {needed:g} GPUs "
          f"(the cluster has {cluster.get('GPU', 0):g}) ...", flush=True)
    request_resources(bundles=[{"GPU": 1}] * math.ceil(needed))
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and ray.cluster_resources().get("GPU", 0) < needed:
            time.sleep(10)
        return ray.cluster_resources()
    finally:
        request_resources(bundles=[])
