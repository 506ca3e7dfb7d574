"""The cluster command of the README and docs/scale-out.md against a real local cluster: `ray start --head`, then
`ray job submit --working-dir . -- python -m reid_ray.tune --method mmt ...`; `ray job stop` mid-sweep,
then the same submission with `--resume` finishes it, and MLflow holds each trial once, none RUNNING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import seed_sweep_source_models
from tests.ray_helpers import committed_epoch

pytestmark = [pytest.mark.ray, pytest.mark.faults]
ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submission_id(printed: str) -> str:
    """The job's id in what `ray job submit --no-wait` printed."""
    return next(w.strip("'") for line in printed.splitlines() for w in line.split() if w.startswith("'raysubmit_"))


@pytest.fixture
def head(tmp_path):
    """A Ray head started by the CLI, as on a cluster (auth off: a local test cluster has no token). It runs
    with --block in a process group of its own, so that the teardown stops this head and its processes only:
    `ray stop` would stop every Ray on the machine."""
    ray_bin = Path(sys.executable).with_name("ray")
    gcs, dash, agent, client = _port(), _port(), _port(), _port()  # defaults (52365, 10001) may be another Ray's
    # the job's entrypoint runs in the head's environment: this interpreter's bin first (CI does not activate
    # the virtual environment)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield ray_bin, f"http://127.0.0.1:{dash}", env, f"127.0.0.1:{gcs}"
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what outlived `ray start` in its group
        except ProcessLookupError:
            pass


@pytest.mark.budget(200)  # `ray start`, two job submissions of a 2-trial sweep, `ray stop`
def test_ray_job_submit_stop_and_resubmit_with_resume(head, tiny_synth, tmp_path):
    from mlflow.tracking import MlflowClient

    ray_bin, address, env, gcs = head
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  params.num_clusters: {distribution: int, low: 8, high: 12}\n"
                     "  optim.lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
                     "fixed:\n  loader.num_identities: 4\n  pretrain_epochs: 1\n  params.iters: 4\n  params.num_clusters: 10\n"
                     "  log_model: false\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    tune = [sys.executable, "-m", "reid_ray.tune", "--method", "mmt", "--data-root", str(tiny_synth), "--output", str(out),
            "--mlflow-uri", uri, "--search-space", str(space), "--num-samples", "2", "--max-concurrent", "1",
            "--epochs", "2", "--scheduler", "none", "--name", "job", "--experiment", "job"]
    seed_sweep_source_models(tune[1:])  # the job finds its source model cached: no pretraining under Ray
    submit = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT)]
    deadline = time.monotonic() + 120
    while True:  # the head (started with --block) and its job agent come up within seconds
        first = subprocess.run([*submit, "--no-wait", "--", *tune], env=env, capture_output=True, text=True,
                               timeout=300, cwd=ROOT)
        starting = any(m in first.stderr for m in ("No available agent", "Failed to connect"))
        if first.returncode == 0 or not starting or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = submission_id(first.stdout)

    def job(*what: str) -> str:
        done = subprocess.run([str(ray_bin), "job", *what, "--address", address, job_id], env=env,
                              capture_output=True, text=True, timeout=120)
        return done.stdout + done.stderr

    def ended() -> str | None:
        """The job's end as `ray job status` words it (succeeded, failed, was stopped), None while it runs."""
        said = job("status")
        return next((end for end in ("succeeded", "failed", "was stopped") if f"Job '{job_id}' {end}" in said), None)

    deadline, polls = time.monotonic() + 600, 0
    while not any(committed_epoch(d) >= 1 for d in out.glob("job-*")):  # mid-sweep: a trial has a checkpoint
        polls += 1
        over = polls % 20 == 0 and ended()
        assert time.monotonic() < deadline and not over, job("logs")[-3000:]
        time.sleep(0.5)
    assert "stopped" in (job("stop") + job("status")).lower()
    # the driver's SIGTERM: the runs it leaves are KILLED (none RUNNING), and its last line says how to resume
    deadline = time.monotonic() + 60
    while ended() != "was stopped" and time.monotonic() < deadline:
        time.sleep(1)
    logs = job("logs")
    assert "reid-ray: stopped (SIGTERM); finished trials are kept, the others continue from their last checkpoint " \
           f"with: python -m reid_ray.tune --resume job --output {out}" in logs, logs[-3000:]
    client = MlflowClient(uri)
    stopped = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    assert not [r for r in stopped if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in stopped]
    assert {r.data.tags.get("status") for r in stopped if r.info.status == "KILLED"} == {"interrupted (SIGTERM)"}

    second = subprocess.run([*submit, "--no-wait", "--", *tune, "--resume"], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert second.returncode == 0, second.stdout + second.stderr
    job_id = submission_id(second.stdout)
    # polled (`ray job status`), bounded, and what the cluster held if it did not end: one CI run saw a blocking
    # `ray job submit` of this job print its first line and then wait past 900 s
    deadline = time.monotonic() + 480
    while not (state := ended()):
        if time.monotonic() > deadline:
            held = subprocess.run([str(ray_bin), "status", "--address", gcs], env=env, capture_output=True, text=True,
                                  timeout=60)
            pytest.fail(f"the resumed job did not end in 480 s\n{held.stdout}\n{job('logs')[-4000:]}")
        time.sleep(2)
    assert state == "succeeded", job("logs")[-4000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    trials = [r for r in runs if "trial_id" in r.data.tags]
    assert len(trials) == 2 and len({r.info.run_name for r in trials}) == 2, [r.info.run_name for r in trials]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert (out / "tune" / "job" / "best_config.yaml").is_file()
