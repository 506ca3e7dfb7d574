"""Why a run stopped on its own: a user's mistake, or divergence, found inside a Ray Train worker.

Ray Train retries every worker error (`FailureConfig.max_failures`), each time from the last
checkpoint; a mistake in the config or the data would fail the same way each time. So the worker
that finds one records it in the run's `Verdict` actor, then raises (which stops the other ranks
wherever they wait). The restarted worker group finds the record before doing anything and returns
at once, and the driver raises it again, on its side, as the one-line `ReidRayError` (exit 2) or
`Diverged` the user sees: no worker traceback, no retries.
"""

from __future__ import annotations

import ray

from reid_ray import Diverged, ReidRayError


class _Verdict:
    def __init__(self):
        self.record: tuple[str, str] | None = None

    def set(self, kind: str, message: str) -> None:
        if self.record is None:  # the first rank's reason; the others' are its echo
            self.record = (kind, message)

    def get(self) -> tuple[str, str] | None:
        return self.record


# no CPU: it only holds one message; restarted (empty) if its process dies
Verdict = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Verdict)


def create_verdict():
    """On the driver's node (a run does not outlive that one), outside any placement group (a Tune trial's
    is sized for its workers)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return Verdict.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()


def recorded(handle) -> tuple[str, str] | None:
    """The recorded reason, or None: also when the actor is gone (a lost node), which records nothing."""
    try:
        return ray.get(handle.get.remote(), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def record(handle, error: ReidRayError) -> None:
    try:
        ray.get(handle.set.remote("diverged" if isinstance(error, Diverged) else "error", str(error)), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass  # then Ray Train retries it as any worker error


def raise_recorded(handle) -> None:
    """On the driver: the recorded reason as the error it was, if a worker recorded one."""
    found = recorded(handle)
    if found is not None:
        kind, message = found
        raise (Diverged if kind == "diverged" else ReidRayError)(message)
