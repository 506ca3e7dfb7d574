"""The live displays of a run and a sweep (their text is reid_ray.console's):

    with RunProgress(run_name, epochs=40) as progress:        # a training run (distributed/driver.py)
        TorchTrainer(..., run_config=RunConfig(callbacks=[progress.callback])).fit()
    SweepProgress(name, num_samples, epochs)    # a Tune callback in the sweep's driver (distributed/sweep.py)

Ray Train calls its callbacks in its controller process, not the driver: a run's rank-0 reports travel to the
driver's display through a Ray queue. Tune calls its callbacks in the sweep's driver.
"""

from __future__ import annotations

import queue as _queue
import threading

import ray
import ray.train
from ray import tune
from ray.util.queue import Empty as QueueEmpty
from ray.util.queue import Queue
from rich.console import Console

from reid_ray.config.sweep import METRIC
from reid_ray.tracking.console import CARRIED, console, epoch_line, make_progress, number, status_text


class _ForwardReports(ray.train.UserCallback):
    """In Ray Train's controller: each report of rank 0, to the driver's queue."""

    def __init__(self, reports):
        self.reports = reports

    def after_report(self, run_context, metrics, checkpoint):
        try:
            self.reports.put_nowait({k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))})
        except Exception:  # the display is best effort: never fail a run for it
            pass


class RunProgress:
    """The live display of one training run on the driver: an epoch bar with the loss, target mAP and ETA,
    and one line per epoch above it."""

    def __init__(self, name: str, epochs: int, con: Console | None = None):
        self.name, self.epochs = name, epochs
        self.reports = Queue(actor_options={"num_cpus": 0})
        self.callback = _ForwardReports(self.reports)
        self.progress = make_progress(con or console())
        self.task = self.progress.add_task(name, total=epochs, status="starting")
        self.last: dict = {}
        self.warned_mlflow = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="reid-ray-progress")

    def __enter__(self) -> RunProgress:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        self.progress.stop()
        try:
            ray.kill(self.reports.actor)
        except Exception:
            pass

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.show(self.reports.get(timeout=0.5))
            except (_queue.Empty, QueueEmpty):
                continue
            except Exception:  # the queue's actor is gone with Ray: nothing more to show
                return

    def _drain(self) -> None:
        while True:
            try:
                self.show(self.reports.get_nowait())
            except Exception:
                return

    def show(self, metrics: dict) -> None:
        # carried between evaluations
        metrics = {**{k: self.last[k] for k in CARRIED if k in self.last and k not in metrics}, **metrics}
        self.last = metrics
        epoch = int(metrics.get("epoch", 0))
        self.progress.update(self.task, completed=epoch, status=status_text(metrics))
        self.progress.console.print(epoch_line(self.name, metrics, self.epochs))
        if metrics.get("mlflow_buffered") and not self.warned_mlflow:
            self.warned_mlflow = True
            self.progress.console.print("[yellow]reid-ray: warning: the MLflow tracking server is unreachable; "
                                        "training goes on and rank 0 keeps its metrics until it is back[/yellow]")



class SweepProgress(tune.Callback):
    """The live display of a sweep, in Tune's driver: a bar of trials done, and one bar per running trial
    (its epochs, loss, target mAP); one line when a trial ends."""

    def __init__(self, name: str, num_samples: int, epochs: int, metric: str = METRIC):
        self.name, self.num_samples, self.epochs, self.metric = name, num_samples, epochs, metric
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __getstate__(self):  # Tune pickles its callbacks with the experiment: the display is rebuilt on restore
        return {"name": self.name, "num_samples": self.num_samples, "epochs": self.epochs, "metric": self.metric}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self, **info) -> None:
        self.progress = make_progress(console())
        self.sweep = self.progress.add_task(f"sweep {self.name}", total=self.num_samples, status="trials")
        self.progress.start()

    def _task(self, trial) -> int:
        if trial.trial_id not in self.tasks:
            self.tasks[trial.trial_id] = self.progress.add_task(f"  trial {trial.trial_id}", total=self.epochs,
                                                                status="starting")
        return self.tasks[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.progress is not None:
            self._task(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.progress is not None:
            carried = {k.removesuffix("_last"): v for k, v in result.items() if k.endswith("_last")}
            self.progress.update(self._task(trial), completed=int(result.get("epoch", 0)),
                                 status=status_text({**carried, **result}))

    def _end(self, trial, how: str) -> None:
        if self.progress is None:
            return
        task = self.tasks.pop(trial.trial_id, None)
        if task is not None:
            self.progress.remove_task(task)
        result = trial.last_result or {}
        how = result.get("trial_status") or how
        if how == "completed" and int(result.get("epoch", 0)) < self.epochs:
            how = "stopped by ASHA"
        score, label = number(result, self.metric), self.metric.removesuffix("_last").replace("_", " ")
        self.progress.console.print(f"trial {trial.trial_id}: {how} after {int(result.get('epoch', 0))} epochs"
                                    + (f", {label} {score:.1f}" if score is not None else ""))
        self.progress.advance(self.sweep)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "error")

    def on_experiment_end(self, trials, **info):
        if self.progress is not None:
            self.progress.stop()
