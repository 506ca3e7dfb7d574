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
import sys
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


SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_uri(uri: str) -> None:
    """A tracking URI's scheme, and that its server answers, before Ray starts (one clear error each)."""
    from reid_ray import ReidRayError

    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri or uri.startswith("databricks") else ""
    if scheme not in SCHEMES:
        raise ReidRayError(f"MLflow tracking URI {uri!r}: unknown scheme; use sqlite:///mlflow.db, "
                           f"http://host:5000 or another of: {', '.join(s + ':' for s in SCHEMES)}")
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ReidRayError(f"MLflow tracking URI {uri}: folder {folder} does not exist; create it or pass "
                               "another --mlflow-uri")
    if scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as e:
            raise ReidRayError(f"MLflow tracking server {uri} is unreachable ({type(e).__name__}); start it "
                               "(mlflow server --host 127.0.0.1 --port 5000) or pass --mlflow-uri "
                               "sqlite:///mlflow.db") from None


def quick_http_failures() -> None:
    """MLflow's HTTP client retries a dead server for ~2 minutes per call; ours give up after seconds
    (and rank 0 buffers, RunWriter). A value the user set is kept."""
    for k, v in QUICK_HTTP.items():
        os.environ.setdefault(k, v)


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


# MLflow 3's UI opens an experiment in its model-training view (runs, charts), not the GenAI traces
# overview, when the experiment is of this kind
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client, experiment: str, create: bool = True) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if create and exp.tags.get("mlflow.experimentKind") is None:  # one an older reid-ray created
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_root(client.tracking_uri),
                                    tags=EXPERIMENT_KIND) if create else None


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a local sqlite store, `mlruns/` beside the database
    file (MLflow's default, `./mlruns`, is relative to whichever process creates the experiment: a Ray worker's
    or a Tune trial's temporary working folder); a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


def ui_hint(uri: str, experiment: str) -> str:
    """How to look at the experiment (indented lines for the summaries): `mlflow ui` over a local store, and the
    link to its runs in the UI's model-training view. MLflow 3.17's UI keeps its GenAI / Model training switch
    in the browser (the experiment's kind tag does not set it), so the link carries
    `workflowType=machine_learning`; a local store's link is for `mlflow ui` on its default port."""
    try:
        exp_id = _experiment_id(_client(uri), experiment, create=False)
    except Exception:  # a server that is down: the summary still prints
        exp_id = None
    server = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if server else "http://127.0.0.1:5000"
    link = f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning" if exp_id else base
    return ("" if server else f"  mlflow ui --backend-store-uri {uri}\n") + f"  {link}"


def system_tags() -> dict[str, str]:
    """MLflow's own system tags for a run started from this process (user, source name and type, git
    commit), from MLflow's context providers. Resolved on the driver: a Ray worker's would name Ray's
    worker script."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: str(v) for k, v in resolve_tags().items() if k.startswith("mlflow.")}


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


def log_metrics(uri: str, run_id: str, metrics: dict, step: int, timestamp_ms: int | None = None) -> None:
    from mlflow.entities import Metric
    ts = timestamp_ms or int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    _client(uri).log_batch(run_id, metrics=items)


def dataset_records(domains) -> list[dict]:
    """The run's datasets as plain records (MLflow dataset inputs, `log_datasets`): name, where they were read
    from, the manifests' content digest, and per split the counts of ids, images and cameras."""
    return [{"name": ds.name, "digest": ds.digest(), "source": str(ds.root), "context": role,
             "profile": ds.stats()} for role, ds in domains.named()]


def log_datasets(uri: str, run_id: str, records: list[dict]) -> None:
    """The records of `dataset_records` as the run's MLflow dataset inputs (context tag: source or target)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(name=r["name"], digest=r["digest"], source_type="local",
                                   source=json.dumps({"uri": r["source"]}), profile=json.dumps(r["profile"])),
                           tags=[InputTag("mlflow.data.context", r["context"])]) for r in records]
    _client(uri).log_inputs(run_id, datasets=inputs)


def log_model(uri: str, run_id: str, emb, metrics: dict, step: int, name: str = "embedder") -> str:
    """A checkpoint's retrieval embedder (`reid_ray.inference.embedder.Embedder`: backbone + BNNeck feature,
    L2-normalised) as an MLflow 3 logged model of the run: torch.export'ed (`pt2`: loads without reid-ray's code,
    any batch size), with an input example and signature, and the checkpoint's metrics linked to it (`best_*`, at
    `step`). Returns the model's id; `mlflow.pytorch.load_model(f"models:/{id}")` loads it."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import infer_signature

    try:
        example = torch.rand(2, 3, *emb.size)  # two images: torch.export keeps the batch dynamic
        with torch.no_grad():
            signature = infer_signature(example.numpy(), emb.module(example).numpy())
    except Exception as e:  # a network torch cannot run on the example: the run and its other records stand
        _warn(f"the best network of {emb.path} was not logged as an MLflow model ({' '.join(str(e).split())[:200]})")
        return ""
    client = _client(uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       params={"network": emb.network, "method": emb.method,
                                               "arch": emb.cfg.model.arch, "checkpoint_sha256": emb.digest})
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # where log_model writes the model's files (this process is rank 0's alone)
    try:
        mlflow.pytorch.log_model(emb.module, name=name, model_id=model.model_id, signature=signature,
                                 input_example=example.numpy(), serialization_format="pt2",
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    finally:
        mlflow.set_tracking_uri(previous)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"best_{k}", float(v), ts, step, model_id=model.model_id)
                                      for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("epoch")])
    return model.model_id


def has_datasets(uri: str, run_id: str) -> bool:
    return bool(_client(uri).get_run(run_id).inputs.dataset_inputs)


def log_figure(uri: str, run_id: str, figure, artifact_file: str) -> None:
    _client(uri).log_figure(run_id, figure, artifact_file)


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


# --------------------------------------------------------------------------- a server that blinks

def _locked(e: Exception) -> bool:
    return "database is locked" in str(e)


def with_retries(fn, *args, attempts: int = 8, first_wait_s: float = 0.1, **kw):
    """`fn(*args, **kw)`, retried with exponential backoff (0.1 s, 0.2 s, ... ~25 s in all) while a shared
    sqlite store answers "database is locked" (concurrent trials writing one file); other errors raise."""
    for i in range(attempts):
        try:
            return fn(*args, **kw)
        except Exception as e:
            if not _locked(e) or i == attempts - 1:
                raise
            time.sleep(first_wait_s * 2 ** i)


QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class RunWriter:
    """Rank 0's writes to its MLflow run, kept when the tracking server is unreachable.

    A write that fails (server down, network gone) warns once and is buffered, in order; every later
    write first retries the buffer, at most every `retry_every_s`. Training never waits for the server
    longer than one quick attempt. `close` makes a last attempt (for up to `close_wait_s`); what still
    cannot be written goes to a local fallback store, `sqlite:///<run_dir>/mlflow-fallback.db` (same
    experiment, run name and run key), whose URI `close` returns so that the summary can name it.
    """

    def __init__(self, uri: str, run_id: str, experiment: str, run_name: str, run_key: str, fallback_dir: Path,
                 retry_every_s: float = 30.0, close_wait_s: float = 60.0):
        self.uri, self.run_id, self.experiment, self.run_name, self.run_key = uri, run_id, experiment, run_name, run_key
        self.fallback_dir, self.retry_every_s, self.close_wait_s = Path(fallback_dir), retry_every_s, close_wait_s
        self.pending: list[tuple] = []   # (method name, args) in the order they were asked for
        self.next_try = 0.0
        self.warned = False
        quick_http_failures()

    _DO = {"metrics": lambda uri, run_id, metrics, step, ts: log_metrics(uri, run_id, metrics, step, ts),
           "artifact": lambda uri, run_id, path, artifact_path: log_artifact(uri, run_id, path, artifact_path),
           "status": lambda uri, run_id, status, note: set_status(uri, run_id, status, note),
           "datasets": lambda uri, run_id, records: log_datasets(uri, run_id, records),
           "figure": lambda uri, run_id, figure, artifact_file: log_figure(uri, run_id, figure, artifact_file),
           "model": lambda uri, run_id, emb, metrics, step: log_model(uri, run_id, emb, metrics, step)}

    def _flush(self, force: bool = False) -> bool:
        """Write the buffer in order; False (and the rest kept) at the first write that fails."""
        if self.pending and not force and time.monotonic() < self.next_try:
            return False
        while self.pending:
            kind, args = self.pending[0]
            try:
                with_retries(self._DO[kind], self.uri, self.run_id, *args)
            except Exception as e:
                self.next_try = time.monotonic() + self.retry_every_s
                if not self.warned:
                    self.warned = True
                    _warn(f"MLflow at {self.uri} is unreachable ({type(e).__name__}); training goes on and its "
                          f"metrics are kept until the server is back")
                return False
            self.pending.pop(0)
            if self.warned and not self.pending:
                self.warned = False
                print(f"reid-ray: MLflow at {self.uri} is back: the buffered metrics are written", flush=True)
        return True

    def _write(self, kind: str, *args) -> None:
        self.pending.append((kind, args))
        self._flush()

    def log_metrics(self, metrics: dict, step: int) -> None:
        # timestamps as logged now, not when the buffer is flushed
        self._write("metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step,
                    int(time.time() * 1000))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._write("artifact", str(path), artifact_path)

    def log_datasets(self, records: list[dict]) -> None:
        self._write("datasets", records)

    def log_model(self, emb, metrics: dict, step: int) -> None:
        self._write("model", emb, metrics, step)

    def log_figure(self, figure, artifact_file: str) -> None:
        self._write("figure", figure, artifact_file)

    def set_status(self, status: str, note: str | None = None) -> None:
        self._write("status", status, note)

    def close(self) -> str | None:
        """The last attempt; the fallback store's URI when something had to go there, else None."""
        deadline = time.monotonic() + self.close_wait_s
        while not self._flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        if not self.pending:
            return None
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        fallback = f"sqlite:///{(self.fallback_dir / 'mlflow-fallback.db').resolve()}"
        run_id = open_run(fallback, self.experiment, self.run_key, self.run_name, {},
                          {"reid_ray.primary_run": f"{self.uri} {self.run_id}"}, {})
        for kind, args in self.pending:
            self._DO[kind](fallback, run_id, *args)
        self.pending.clear()
        _warn(f"MLflow at {self.uri} stayed unreachable: the rest of this run's metrics are in {fallback} "
              f"(mlflow ui --backend-store-uri {fallback})")
        return fallback


def _warn(line: str) -> None:
    print(f"reid-ray: warning: {line}", file=sys.stderr, flush=True)


def cmc_plot(curves: dict[str, list[float]], path: str | os.PathLike):
    """CMC curves (rank 1..N, in %) of several test sets, as a PNG; returns the figure (for `log_figure`)."""
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
    plt.close(fig)  # closed to pyplot, still drawable by log_figure
    return fig
