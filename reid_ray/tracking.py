"""MLflow tracking: one run per training run, written by its rank 0 only.

Stateless helpers over `MlflowClient`, so a Ray worker logs without any global MLflow
state. Rank 0 opens its run (`open_run`: found again by its `reid_ray.run_key` tag when
Ray Train restarts the worker group, or when a resumed sweep restarts a trial), logs to it
and sets its status; the driver and the sweep only read runs (`find_runs`). Default tracking URI:
`sqlite:///mlflow.db` in the working directory (the file store is deprecated);
`--mlflow-uri` and `MLFLOW_TRACKING_URI` override. Open the UI with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from reid_ray import atomic_path


def resolve_uri(uri: str = "") -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # workers run in other directories: pin a relative sqlite path to this one
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


RUN_KEY = "reid_ray.run_key"


def _experiment_id(client, experiment: str, create: bool = True) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(experiment) if create else None


def find_runs(uri: str, experiment: str, tag: str, value: str) -> list:
    """The runs of `experiment` whose tag `tag` is `value` (newest first)."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment, create=False)
    if exp_id is None:
        return []
    return client.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time DESC"])


def open_run(uri: str, experiment: str, run_key: str, run_name: str, params: dict, tags: dict, config: dict) -> str:
    """The run tagged `run_key`, marked RUNNING again, or a new one (params, tags, config YAML); its id."""
    found = find_runs(uri, experiment, RUN_KEY, run_key)
    if found:
        set_status(uri, found[0].info.run_id, "RUNNING", "running")
        return found[0].info.run_id
    return start_run(uri, experiment, run_name, params, {**tags, RUN_KEY: run_key, "status": "running"}, config)


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict, config: dict) -> str:
    """Create the run (params, tags, config YAML artifact); returns its id."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={**tags, "git_commit": git_commit()})
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    _client(uri).log_batch(run_id, metrics=items)


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _client(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status)


def set_status(uri: str, run_id: str, status: str, note: str | None = None) -> None:
    """The run's MLflow status (RUNNING, or a terminal one) and, with `note`, its `status` tag."""
    client = _client(uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)
    if note is not None:
        client.set_tag(run_id, "status", note)


def cmc_plot(curves: dict[str, list[float]], path: str | os.PathLike) -> None:
    """CMC curves (rank 1..N, in %) of several test sets, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, cmc in curves.items():
        ax.plot(range(1, len(cmc) + 1), [100 * c for c in cmc], label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
