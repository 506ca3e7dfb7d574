"""What happens to every long run on rented machines: Ctrl-C, a preemption notice (SIGTERM), a full disk, a
checkpoint cut short, two sweeps started under one name, a dataset changed under a resumed run; and `--resume`
continuing the run it names (its config, name, folder and MLflow run)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reid_ray import Interrupted, ReidRayError, catch_stop_signals
from reid_ray.config import resolve_config, to_dict
from reid_ray.training.checkpoint import CHECKPOINT_FILE, newest_readable_checkpoint, save_checkpoint
from tests.conftest import cli_env, run_cli


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# --------------------------------------------------------------------------- the signals, in-process

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_is_interrupted_then_the_exit_code_and_a_second_one_stops_at_once(sig, code, restore_signals,
                                                                                      capsys):
    from reid_ray.cli import run_cli as cli

    def work(_args):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises here
        return 0

    assert cli(work, None) == code
    assert capsys.readouterr().err == f"reid-ray: stopped ({signal.Signals(sig).name})\n"
    # the first signal gave the defaults back: a second Ctrl-C (or SIGTERM) ends the process without the cleanup
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.ray
def test_ray_init_does_not_take_sigterm_back(restore_signals):
    """`ray.init` installs a SIGTERM handler that exits without a word; init_ray puts the CLI's back."""
    import ray

    from reid_ray.distributed.runtime import init_ray

    catch_stop_signals()
    was_up = ray.is_initialized()
    init_ray()
    try:
        with pytest.raises(Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert stopped.value.exit_code == 143
    finally:
        if not was_up:
            ray.shutdown()


# --------------------------------------------------------------------------- --resume continues the run

def _saved_run(tmp_path: Path, data_root: Path, **flags) -> tuple[str, dict]:
    cfg = resolve_config("baseline", sets=["loader.num_identities=8", "optim.lr=0.0007"],
                         flags=dict(data_root=str(data_root), output=str(tmp_path / "out"), name="mine", epochs=5,
                                    mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}", **flags))
    ckpt = tmp_path / "out" / "mine" / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    torch.save({"method": {}, "epoch": 1, "config": to_dict(cfg), "run_key": "k"}, ckpt / CHECKPOINT_FILE)
    return str(ckpt), to_dict(cfg)


def test_resume_by_run_name_restores_the_runs_config_and_names_each_flag_that_changes_it(tiny_synth, tmp_path,
                                                                                         capsys, monkeypatch):
    from reid_ray.cli.train import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    ckpt, saved = _saved_run(tmp_path, tiny_synth)
    cfg = config_from_args(build_parser().parse_args(["--resume", "mine", "--output", str(tmp_path / "out")]))
    assert to_dict(cfg) == {**saved, "resume": ckpt}  # epochs, P, lr, name, folder, store: the run's own
    assert capsys.readouterr().out == ""  # nothing changed, nothing said

    cfg = config_from_args(build_parser().parse_args(["--resume", ckpt, "--epochs", "30", "--set", "optim.lr=1e-3"]))
    assert (cfg.epochs, cfg.optim.lr, cfg.loader.num_identities, cfg.name) == (30, 1e-3, 8, "mine")
    assert capsys.readouterr().out.splitlines() == ["--resume: epochs 5 → 30", "--resume: optim.lr 0.0007 → 0.001"]


def test_resume_refuses_another_method_and_passes_over_a_checkpoint_cut_short(tiny_synth, tmp_path, capsys):
    from reid_ray.cli.train import build_parser, config_from_args

    ckpt, _ = _saved_run(tmp_path, tiny_synth)
    with pytest.raises(ReidRayError, match="a checkpoint of method 'baseline', not 'mmt'; pass --method baseline"):
        config_from_args(build_parser().parse_args(["--method", "mmt", "--resume", ckpt]))
    newer = Path(ckpt).parent / "checkpoint_2026-01-02_00-00-00.000000"
    newer.mkdir()
    (newer / CHECKPOINT_FILE).write_bytes((Path(ckpt) / CHECKPOINT_FILE).read_bytes()[:100])  # cut short
    cfg = config_from_args(build_parser().parse_args(["--resume", "mine", "--output", str(tmp_path / "out")]))
    assert cfg.resume == ckpt
    assert capsys.readouterr().out == f"--resume: {newer} does not load (cut short?); using {ckpt}\n"
    assert newest_readable_checkpoint(Path(ckpt).parent) == (ckpt, [newer.name])


def test_a_resumed_run_keeps_its_mlflow_run_and_warns_once_per_changed_dataset(tiny_synth, tmp_path, capsys):
    from reid_ray.data.domains import load_domains
    from reid_ray.distributed.driver import resumed_state, warn_changed_data

    ckpt, saved = _saved_run(tmp_path, tiny_synth)
    cfg = resolve_config("baseline", flags=dict(resume=ckpt, name="mine", data_root=str(tiny_synth)))
    state = resumed_state(cfg)
    assert state["run_key"] == "k"  # the same name: rank 0 reopens the run tagged with it
    assert resumed_state(resolve_config("baseline", flags=dict(resume=ckpt, name="branch")))["run_key"] is None
    domains = load_domains("synth-a", "synth-b", str(tiny_synth))
    warn_changed_data({"data": {"source": domains.source.digest(), "target": "0123"}}, domains, ckpt)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"reid-ray: warning: the target dataset synth-b changed since {ckpt} was written (manifest "
                   f"digest 0123 -> {domains.target.digest()}); resuming on the data as it is now"]


# --------------------------------------------------------------------------- a full disk, a checkpoint cut short

def test_a_full_disk_while_checkpointing_keeps_the_previous_file_and_names_the_disk(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint({"w": torch.ones(3)}, path)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ReidRayError, match=rf"the disk holding {tmp_path} is full \(\d+ MiB free, about 1 MiB needed\) "
                                           r"writing best.pt: the previous checkpoint is intact"):
        save_checkpoint({"w": torch.ones(2**18)}, path)
    assert torch.load(path)["w"].tolist() == [1.0, 1.0, 1.0]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # and no temporary left behind

    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # any other error stays itself
        save_checkpoint({}, path)


def test_a_restarted_worker_group_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    for i, stamp in enumerate(("01", "02", "03")):
        d = tmp_path / f"checkpoint_2026-01-{stamp}_00-00-00.000000"
        d.mkdir()
        torch.save({"method": {}, "epoch": i}, d / CHECKPOINT_FILE)
    newest = tmp_path / "checkpoint_2026-01-03_00-00-00.000000" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:50])
    found, bad = newest_readable_checkpoint(tmp_path)
    assert (Path(found).name, bad) == ("checkpoint_2026-01-02_00-00-00.000000", ["checkpoint_2026-01-03_00-00-00.000000"])
    found, _ = newest_readable_checkpoint(tmp_path, skip=("checkpoint_2026-01-02_00-00-00.000000",))
    assert Path(found).name == "checkpoint_2026-01-01_00-00-00.000000"


# --------------------------------------------------------------------------- two sweeps, one name

def test_a_second_sweep_under_one_name_is_refused_and_a_crashed_one_leaves_no_stuck_lock(tmp_path):
    from reid_ray.distributed.sweep import sweep_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom reid_ray.distributed.sweep import sweep_lock\n"
        f"with sweep_lock({str(tmp_path)!r}, 's'):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env=cli_env(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ReidRayError, match=rf"sweep s is running already \(pid {holder.pid} on .*\); wait for it"):
            with sweep_lock(tmp_path, "s"):
                pass
    finally:
        holder.kill()  # a crash: no cleanup ran
        holder.wait()
    with sweep_lock(tmp_path, "s"):  # the lock went with its process
        pass
    assert (tmp_path / ".lock").exists()


# --------------------------------------------------------------------------- Ctrl-C, then SIGTERM, then done

def _status(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.info.run_name == name], client


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=cli_env(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"ended before {what}: " + "".join(proc.communicate())
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(0.1)


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.budget(120)  # three train processes, each with its own Ray
def test_ctrl_c_then_sigterm_then_a_bare_resume_ends_like_the_uninterrupted_run(cli_training, tmp_path):
    """The CLI run of conftest (4 epochs), again under another name: Ctrl-C after its first checkpoint; a bare
    `--resume NAME` SIGTERMed once its MLflow run is RUNNING again; a second bare `--resume NAME` finishes it.
    Each stop exits 130/143 with the resume command, and leaves its MLflow run KILLED; the end is the
    uninterrupted run's, in the same MLflow run."""
    argv = [*cli_training.argv, "--name", "stopped", "--output", str(tmp_path / "out"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", "checkpoint_every=1"]
    uri, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out" / "stopped"
    resume = ["-m", "reid_ray.train", "--resume", "stopped", "--output", str(tmp_path / "out")]
    proc = _start(argv, tmp_path)
    # Ray Train's record of a committed checkpoint (written once the checkpoint is in place)
    _wait_for(lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(), proc, "first checkpoint")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert err.splitlines()[-1] == f"reid-ray: stopped (SIGINT); resume with: python -m reid_ray.train --resume " \
                                   f"stopped --output {tmp_path / 'out'}", err
    assert "Traceback" not in out + err
    (run,), client = _status(uri, "stopped")
    assert (run.info.status, run.data.tags["status"]) == ("KILLED", "interrupted (SIGINT)")

    proc = _start(resume, tmp_path)
    _wait_for(lambda: _status(uri, "stopped")[0][0].info.status == "RUNNING", proc, "MLflow run reopened")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    assert err.splitlines()[-1].startswith("reid-ray: stopped (SIGTERM); resume with: python -m reid_ray.train "
                                           "--resume stopped"), err
    (again,), _ = _status(uri, "stopped")
    assert again.info.run_id == run.info.run_id and again.info.status == "KILLED", again.info

    done = run_cli(resume, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (final,), _ = _status(uri, "stopped")
    assert final.info.run_id == run.info.run_id and final.info.status == "FINISHED"
    reference, ref_client = _status(cli_training.uri, "quiet")
    # by step: an epoch whose checkpoint a stop cut off is trained again and logged again, with the same value
    history = {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, "target_mAP"),
                                               key=lambda m: m.timestamp)}
    expected = {m.step: m.value for m in ref_client.get_metric_history(reference[0].info.run_id, "target_mAP")}
    assert sorted(history) == sorted(expected) == [2, 4]
    assert [history[s] for s in (2, 4)] == pytest.approx([expected[s] for s in (2, 4)], abs=1e-6)


def test_a_tracking_server_gone_at_the_end_is_said_so_not_run_none(capsys):
    from reid_ray.cli.train import print_summary
    from reid_ray.config import resolve_config

    out = {"metrics": {"source_mAP": 50.0, "target_mAP": 20.0}, "wall_time": 3.0, "mlflow_run_id": None,
           "mlflow_uri": "http://127.0.0.1:9", "checkpoint": "/o/r/checkpoint_x", "run_dir": "/o/r",
           "mlflow_fallback": "sqlite:////o/r/mlflow-fallback.db"}
    print_summary(resolve_config("baseline"), out)
    text = " ".join(capsys.readouterr().out.split())
    assert "MLflow run None" not in text and "MLflow run: http://127.0.0.1:9 did not answer at the end" in text
    assert "the rest of the run's metrics are in sqlite:////o/r/mlflow-fallback.db" in text
    assert "download it" not in text  # a local store opens as it is


def test_a_sweep_stopped_by_ctrl_c_says_how_to_resume_and_exits_130(tiny_synth, tmp_path, capsys, monkeypatch,
                                                                     restore_signals):
    """`python -m reid_ray.tune` when Ctrl-C reaches it mid-sweep (the sweep's own stop, its runs marked KILLED,
    is the SIGTERM path `ray job stop` tests for real: tests/test_ray_job.py): one line naming the signal and
    the command that resumes the sweep, exit 130. Before the sweep's state exists, the line says to rerun."""
    import signal

    import reid_ray.distributed.sweep as sweeps
    from reid_ray import Interrupted
    from reid_ray.cli.tune import main
    from reid_ray.config.sweep import sweep_dir

    def started_then_stopped(sweep):
        sweep.save(sweep_dir(sweep.base.output, sweep.name))  # what a running sweep has written
        raise Interrupted(signal.SIGINT)

    argv = ["--method", "baseline", "--data-root", str(tiny_synth), "--name", "s", "--output", str(tmp_path / "out"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", "num_identities=4"]
    monkeypatch.setattr(sweeps, "run_sweep", started_then_stopped)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"reid-ray: stopped (SIGINT); finished trials are kept, the others continue from their last "
                   f"checkpoint with: python -m reid_ray.tune --resume s --output {tmp_path / 'out'}"], err

    def stopped_at_once(sweep):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(sweeps, "run_sweep", stopped_at_once)
    assert main([*argv[:4], "--name", "t", *argv[6:]]) == 143
    assert capsys.readouterr().err.strip() == ("reid-ray: stopped (SIGTERM); before the sweep's first trial; "
                                               "rerun the same command")
