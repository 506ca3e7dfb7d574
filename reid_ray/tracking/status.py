"""Who ends an MLflow run, and with which status: every status reid-ray writes is decided here.

The rule: a run's rank 0 writes its own status (`RunWriter.set_status`: RUNNING when it opens or reopens the
run, FINISHED when its last epoch is done, FAILED with the reason when it raised). Someone else ends a run only
where its rank 0 cannot, and only a run still RUNNING:

    closed_after_failure     the driver, after Ray Train gave up (max_failures exhausted) on a group whose
                             rank 0 was killed, not one that raised: FAILED "failed"
    closed_after_interrupt   the driver or the sweep, after Ctrl-C or SIGTERM: KILLED "interrupted (SIGINT)"; also a
                             run its rank 0 ended FAILED "failed" after the stop began, as it tore the worker group
                             down (the generic note of a rank that died under it; a user error or a divergence, or a
                             failure before the stop, keeps its own)
    closed_by_tune           the sweep's Tune callback, for a trial Tune stopped or lost: ASHA's stop before the
                             last epoch is KILLED "stopped by ASHA"; a stop at the last epoch (a rung on max_t, before
                             rank 0 ended its run) FINISHED "completed"; a trial error FAILED "error"
    end_sweep                the sweep driver, for the sweep's parent run: FINISHED, or FAILED when it raised (an
                             interrupted sweep's parent is closed_after_interrupt's)
"""

from __future__ import annotations

from reid_ray.tracking.runs import find_runs, set_status


def _close_running(uri: str, experiment: str, tag: str, value: str, status: str, note: str,
                   torn_down_since_ms: int | None = None) -> int:
    closed = 0
    for run in find_runs(uri, experiment, tag, value):
        torn_down = (torn_down_since_ms is not None and run.info.status == "FAILED"
                     and run.data.tags.get("status") == "failed" and (run.info.end_time or 0) >= torn_down_since_ms)
        if run.info.status == "RUNNING" or torn_down:
            set_status(uri, run.info.run_id, status, note)
            closed += 1
    return closed


def closed_after_failure(uri: str, experiment: str, tag: str, value: str) -> int:
    return _close_running(uri, experiment, tag, value, "FAILED", "failed")


def closed_after_interrupt(uri: str, experiment: str, tag: str, value: str, reason: str, since_ms: int) -> int:
    """`since_ms`: when the stop began (a run that failed before it keeps its FAILED)."""
    return _close_running(uri, experiment, tag, value, "KILLED", f"interrupted ({reason})", torn_down_since_ms=since_ms)


def closed_by_tune(uri: str, experiment: str, trial_id: str, *, error: bool, epoch: int, epochs: int) -> int:
    if error:
        status, note = "FAILED", "error"
    elif epoch < epochs:
        status, note = "KILLED", "stopped by ASHA"
    else:
        status, note = "FINISHED", "completed"
    return _close_running(uri, experiment, "trial_id", trial_id, status, note)


def end_sweep(uri: str, parent_run_id: str, status: str) -> None:
    set_status(uri, parent_run_id, status)
