"""MLflow tracking: one run per training run, written by the driver and rank 0 only.

Stateless helpers over `MlflowClient`, so a Ray worker can log to the run the
driver created without any global MLflow state. Default tracking URI:
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


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict, config: dict) -> str:
    """Create the run (params, tags, config YAML artifact); returns its id."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
