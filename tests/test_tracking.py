"""MLflow tracking that survives: a tracking server stopped mid-run (buffer, then the fallback store),
concurrent writers on one sqlite store, and clear errors for a URI that cannot work."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reid_ray import ReidRayError, tracking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` on 127.0.0.1 over a sqlite store, that a test can stop and start again."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--default-artifact-root", str(self.root / "artifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                tracking.check_uri(self.uri)
                return
            except ReidRayError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, 9)
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.mark.faults
def test_a_server_stopped_mid_run_buffers_then_flushes_then_falls_back(server, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    for k in tracking.QUICK_HTTP:  # what RunWriter sets in rank 0 (and the driver), never the user's
        monkeypatch.delenv(k, raising=False)
    run_id = tracking.open_run(server.uri, "blink", "key-1", "run", {"a": 1}, {}, {})
    w = tracking.RunWriter(server.uri, run_id, "blink", "run", "key-1", tmp_path / "run", retry_every_s=0,
                           close_wait_s=0)
    w.log_metrics({"target_mAP": 10.0}, step=1)
    server.stop()
    t0 = time.monotonic()
    w.log_metrics({"target_mAP": 20.0}, step=2)   # buffered, one warning
    w.log_metrics({"target_mAP": 30.0}, step=3)
    assert time.monotonic() - t0 < 20, "training waited for the server"
    err = capsys.readouterr().err
    assert err.count("reid-ray: warning: MLflow at") == 1 and "unreachable" in err
    assert len(w.pending) == 2
    server.start()
    w.log_metrics({"target_mAP": 40.0}, step=4)   # the buffer first, in order
    assert not w.pending and "is back" in capsys.readouterr().out
    hist = MlflowClient(server.uri).get_metric_history(run_id, "target_mAP")
    assert [(h.step, h.value) for h in sorted(hist, key=lambda h: h.step)] == [(1, 10), (2, 20), (3, 30), (4, 40)]

    server.stop()
    w.log_metrics({"target_mAP": 50.0}, step=5)
    w.set_status("FINISHED", "completed")
    fallback = w.close()
    assert fallback == f"sqlite:///{tmp_path / 'run' / 'mlflow-fallback.db'}"
    client = MlflowClient(fallback)
    (run,) = client.search_runs([client.get_experiment_by_name("blink").experiment_id])
    assert [h.value for h in client.get_metric_history(run.info.run_id, "target_mAP")] == [50.0]
    assert run.info.status == "FINISHED" and run.data.tags[tracking.RUN_KEY] == "key-1"
    assert "stayed unreachable" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.faults
def test_a_training_run_outlives_a_tracking_server_that_blinks(server, tiny_synth, tmp_path):
    """`python -m reid_ray.train` against a real `mlflow server` that is stopped once epoch 1 is committed and
    started again after epoch 2: training goes on, the console shows one warning, the run finishes, and
    every epoch's metrics reach the server (rank 0 buffered them, then flushed them in order)."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import cli_env
    from tests.ray_helpers import committed_epoch

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "reid_ray.train", "--data-root", str(tiny_synth), "--epochs", "4",
            "--eval-every", "2", "--workers", "1", "--output", str(out), "--mlflow-uri", server.uri,
            "--experiment", "blink", "--name", "blink", "--set", "num_identities=4", "--set", "log_model=false"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while committed_epoch(out / "blink") < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    server.stop()
    while committed_epoch(out / "blink") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped_for = committed_epoch(out / "blink")
    server.start()
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert stopped_for >= 2  # the server was down while epoch 2 trained and reported
    assert text.count("the MLflow tracking server is unreachable") == 1, text
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("blink").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "target_mAP")) == [2, 4]
    assert not (out / "blink" / "mlflow-fallback.db").exists()  # nothing was left for the fallback store


def _hammer(uri: str, run_id: str, worker: int, n: int) -> None:
    for i in range(n):
        tracking.with_retries(tracking.log_metrics, uri, run_id, {f"m{worker}": float(i)}, i)


def test_concurrent_writers_on_one_sqlite_store_lose_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = [tracking.open_run(uri, "concurrent", f"k{i}", f"trial{i}", {"i": i}, {}, {}) for i in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(uri, runs[i], i, 60)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    client = MlflowClient(uri)
    assert [len(client.get_metric_history(runs[i], f"m{i}")) for i in range(2)] == [60, 60]


def test_with_retries_waits_out_a_locked_database_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.with_retries(flaky, first_wait_s=0.001) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        tracking.with_retries(lambda: (_ for _ in ()).throw(ValueError("another error")))


@pytest.mark.parametrize("uri, message", [
    ("ftp://host/store", "unknown scheme"),
    ("mlflow.db", "unknown scheme"),
    ("sqlite:////no/such/folder/mlflow.db", "folder /no/such/folder does not exist"),
    (f"http://127.0.0.1:{_free_port()}", "is unreachable"),
])
def test_a_tracking_uri_that_cannot_work_is_one_clear_error(uri, message):
    with pytest.raises(ReidRayError, match=message):
        tracking.check_uri(uri)


def test_an_interrupt_closes_the_runs_it_tore_down_and_no_other(tmp_path):
    """After Ctrl-C or SIGTERM the driver marks its runs KILLED: the ones still RUNNING, and one its rank 0 ended
    FAILED "failed" as the stop tore the worker group down; a failure from before the stop, or a user error,
    keeps its own status."""
    import time

    from mlflow.tracking import MlflowClient

    from reid_ray.tracking import start_run
    from reid_ray.tracking.status import closed_after_interrupt

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    ids = {name: start_run(uri, "e", name, {}, {"sweep": "s"}, {}) for name in ("running", "early", "torn", "error")}
    tracking.set_status(uri, ids["early"], "FAILED", "failed")
    time.sleep(0.05)
    began_ms = int(time.time() * 1000)
    time.sleep(0.05)
    tracking.set_status(uri, ids["torn"], "FAILED", "failed")
    tracking.set_status(uri, ids["error"], "FAILED", "error: params.k=0")
    assert closed_after_interrupt(uri, "e", "sweep", "s", "SIGTERM", began_ms) == 2
    got = {name: (client.get_run(i).info.status, client.get_run(i).data.tags["status"]) for name, i in ids.items()}
    assert got == {"running": ("KILLED", "interrupted (SIGTERM)"), "torn": ("KILLED", "interrupted (SIGTERM)"),
                   "early": ("FAILED", "failed"), "error": ("FAILED", "error: params.k=0")}, got
