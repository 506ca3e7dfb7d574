"""What a person sees in the terminal: one live `rich` display (sweep -> trial -> epoch), our own lines once,
and Ray's, Ray Train's and Tune's console output off unless `--verbose`.

    console.set_verbose(args.verbose)          # the CLIs, before Ray starts
    with RunProgress("mmt-...", epochs=40) as progress:       # a training run (distributed/driver.py)
        TorchTrainer(..., run_config=RunConfig(callbacks=[progress.callback])).fit()
    SweepProgress(num_samples, epochs)          # a Tune callback in the sweep's driver (distributed/sweep.py)

Nothing is lost when the console is quiet: the workers' and Ray's own output stays in Ray's session logs
(`/tmp/ray/session_latest/logs`), and every epoch's metrics are in MLflow. A run's rank-0 report travels to
the driver through a Ray queue (Ray Train calls its callbacks in its controller process, not the driver).
"""

from __future__ import annotations

import logging
import math
import os
import queue as _queue
import threading

import ray.train
from ray import tune
from ray.util.queue import Empty as QueueEmpty
from ray.util.queue import Queue
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from reid_ray.sweep_config import METRIC

_state = {"verbose": False}

# libraries whose INFO lines say what our display already says (MLflow's and alembic's schema set-up, Optuna's
# "A new study created", Ray's start-up banner)
CHATTY = ("mlflow", "alembic", "optuna", "ray", "ray.tune", "ray.train")


def set_verbose(on: bool) -> None:
    """Quiet (the default): our display only. Verbose: Ray's, Tune's and the workers' own output too."""
    _state["verbose"] = bool(on)
    level = logging.INFO if on else logging.WARNING
    if not on:
        # MLflow sets its own logger's level when it is imported (here, or in a Ray worker: both read this)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # Tune's newer console output prints its header and a TensorBoard hint even at verbose=0; its
        # classic reporter prints nothing there
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)
    # Ray's note at every local start that token authentication is on (its default, which we keep)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(level if on else logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.INFO if on else optuna.logging.WARNING)
    except ImportError:
        pass


def verbose() -> bool:
    return _state["verbose"]


def console() -> Console:
    return Console(highlight=False)


def _progress(con: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=con, transient=False)


def _num(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else None


def status_text(metrics: dict) -> str:
    """The fields a person watches: the loss and the latest target mAP."""
    parts = []
    if (loss := _num(metrics, "loss")) is not None:
        parts.append(f"loss {loss:.3f}")
    if (mAP := _num(metrics, "target_mAP")) is not None:
        parts.append(f"target mAP {mAP:.1f}")
    return "  ".join(parts)


def epoch_line(name: str, metrics: dict, epochs: int) -> str:
    """One line per epoch: what `[epoch n/N]` said on the workers' consoles, shorter."""
    line = f"{name}  epoch {int(metrics.get('epoch', 0))}/{epochs}  {status_text(metrics)}"
    for key, label in (("target_R1", "R1"), ("source_mAP", "source mAP")):
        if (v := _num(metrics, key)) is not None:
            line += f"  {label} {v:.1f}"
    if (t := _num(metrics, "epoch_time")) is not None:
        line += f"  ({t:.1f} s)"
    return line


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
        self.progress = _progress(con or console())
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
        if "target_mAP" not in metrics and "target_mAP" in self.last:
            metrics = {**metrics, "target_mAP": self.last["target_mAP"]}  # carried between evaluations
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

    def __init__(self, name: str, num_samples: int, epochs: int):
        self.name, self.num_samples, self.epochs = name, num_samples, epochs
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __getstate__(self):  # Tune pickles its callbacks with the experiment: the display is rebuilt on restore
        return {"name": self.name, "num_samples": self.num_samples, "epochs": self.epochs}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self, **info) -> None:
        self.progress = _progress(console())
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
            self.progress.update(self._task(trial), completed=int(result.get("epoch", 0)), status=status_text(
                {**result, "target_mAP": result.get("target_mAP", result.get(METRIC))}))

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
        mAP = _num(result, METRIC)
        self.progress.console.print(f"trial {trial.trial_id}: {how} after {int(result.get('epoch', 0))} epochs"
                                    + (f", target mAP {mAP:.1f}" if mAP is not None else ""))
        self.progress.advance(self.sweep)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "error")

    def on_experiment_end(self, trials, **info):
        if self.progress is not None:
            self.progress.stop()
