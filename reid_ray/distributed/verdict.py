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


# no CPU: it only holds one message; outside any placement group (a Tune trial's is sized for its workers)
Verdict = ray.remote(num_cpus=0)(_Verdict)


def create_verdict():
    return Verdict.options(scheduling_strategy="DEFAULT").remote()


def record(handle, error: ReidRayError) -> None:
    ray.get(handle.set.remote("diverged" if isinstance(error, Diverged) else "error", str(error)))


def raise_recorded(handle) -> None:
    """On the driver: the recorded reason as the error it was, if a worker recorded one."""
    found = ray.get(handle.get.remote())
    if found is not None:
        kind, message = found
        raise (Diverged if kind == "diverged" else ReidRayError)(message)
