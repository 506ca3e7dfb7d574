"""What a person sees in the terminal: one live `rich` display (sweep -> trial -> epoch), our own lines once,
and Ray's, Ray Train's and Tune's console output off unless `--verbose`.

    console.set_verbose(args.verbose)          # the CLIs, before Ray starts
    epoch_line(name, metrics, epochs)           # what the live displays print (distributed/progress.py)

Nothing is lost when the console is quiet: the workers' and Ray's own output stays in Ray's session logs
(`/tmp/ray/session_latest/logs`), and every epoch's metrics are in MLflow. The live displays themselves are Ray
callbacks, in the Ray layer: distributed/progress.py.
"""

from __future__ import annotations

import logging
import math
import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

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


def make_progress(con: Console) -> Progress:
    """The one live bar of reid-ray. On a narrow terminal the name and the status give way (an ellipsis), never
    the times. Off a terminal (a log file, `ray job logs`, CI) no bar is drawn: rich would render it once, at
    the end, cut to the log's width; the per-epoch lines printed through `progress.console` are the record."""
    def fixed(width: int = 0) -> Column:
        return Column(no_wrap=True, min_width=width or None)

    return Progress(TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                    BarColumn(bar_width=24), MofNCompleteColumn(table_column=fixed()),
                    TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=2)),
                    TimeElapsedColumn(table_column=fixed(7)), TextColumn("eta", table_column=fixed()),
                    TimeRemainingColumn(table_column=fixed(7)), console=con, transient=False,
                    disable=not con.is_terminal)


def number(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else None


# the scores of an evaluation a person watches, carried on the display between evaluations
CARRIED = {"target_mAP": "target mAP", "source_val_mAP": "source-val mAP", "target_probe": "probe",
           "target_sharpness": "sharpness"}


def status_text(metrics: dict) -> str:
    """The fields a person watches: the loss, the latest target mAP (where the target has labels) and the
    label-free scores."""
    parts = []
    if (loss := number(metrics, "loss")) is not None:
        parts.append(f"loss {loss:.3f}")
    for key, label in CARRIED.items():
        if (v := number(metrics, key)) is not None:
            parts.append(f"{label} {v:.1f}")
    return "  ".join(parts)


def epoch_line(name: str, metrics: dict, epochs: int) -> str:
    """One line per epoch: what `[epoch n/N]` said on the workers' consoles, shorter."""
    line = f"{name}  epoch {int(metrics.get('epoch', 0))}/{epochs}  {status_text(metrics)}"
    for key, label in (("target_R1", "R1"), ("source_mAP", "source mAP")):
        if (v := number(metrics, key)) is not None:
            line += f"  {label} {v:.1f}"
    if (t := number(metrics, "epoch_time")) is not None:
        line += f"  ({t:.1f} s)"
    return line
