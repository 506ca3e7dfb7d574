"""`--output` on an object store: runs, resumes, the source-model cache and sweeps under an s3:// URI, against
moto's S3 server on 127.0.0.1 (pyarrow and Ray Train find it through AWS_ENDPOINT_URL)."""

import socket
import tempfile
import time
import types
from pathlib import Path

import pytest
import torch

from reid_ray import ReidRayError, storage
from reid_ray.config import resolve_config

BUCKET = "reid-ray-test"
OUT = f"s3://{BUCKET}/runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 on a free local port, one bucket, and the AWS settings pyarrow (and Ray, started after them)
    reads; everything outside the test's reach (profiles, config files, instance metadata) switched off."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    none = str(tmp_path_factory.mktemp("aws") / "none")
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": none,
                     "AWS_SHARED_CREDENTIALS_FILE": none}.items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield types.SimpleNamespace(client=client, keys=lambda prefix="": sorted(
            o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", []) if not o["Key"].endswith("/")))  # not pyarrow's folder markers
    server.stop()


@pytest.fixture(scope="module")
def ray_s3(s3, tmp_path_factory):
    """A local Ray started after the S3 settings are in the environment (its workers inherit them), with its own
    cache folder for the files the workers fetch."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REID_RAY_CACHE", str(tmp_path_factory.mktemp("worker-cache")))
        ray.init(address="local", num_cpus=2)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module's tests (making one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _fake_checkpoint(s3, uri: str) -> None:
    """A reid-ray checkpoint file at `uri`, small: a baseline's config and one network tensor."""
    cfg = resolve_config("baseline")
    from reid_ray.config import to_dict

    state = {"method": {"models": {"net": {"w": torch.ones(2)}}}, "config": to_dict(cfg), "epoch": 0}
    path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
    torch.save(state, path)
    storage.upload(path, uri)


def test_storage_helpers_on_s3_and_locally(s3, tmp_path):
    run = storage.join(OUT, "helpers")
    assert run == f"{OUT}/helpers" and run / "a.txt" == f"{OUT}/helpers/a.txt"
    assert storage.join(tmp_path, "x") == tmp_path / "x" and not storage.is_uri(str(tmp_path))
    assert storage.join("s3://b/p?endpoint_override=h", "x") == "s3://b/p/x?endpoint_override=h"
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "b.txt").write_text("B")
    storage.upload(tmp_path / "folder", run)
    storage.write_text(run / "a.txt", "A")
    assert s3.keys("runs/helpers/") == ["runs/helpers/a.txt", "runs/helpers/sub/b.txt"]
    assert storage.is_dir(run) and storage.is_file(run / "a.txt") and not storage.exists(run / "nope")
    assert storage.read_text(run / "sub" / "b.txt") == "B"
    local = storage.fetch(run / "a.txt")
    assert local.read_text() == "A" and storage.cache_dir() in local.parents and storage.fetch(run / "a.txt") == local
    storage.write_text(run / "a.txt", "AA")  # rewritten there: fetched again
    assert storage.fetch(run / "a.txt").read_text() == "AA"
    assert {rel for rel, is_file, _ in storage.listing(run, recursive=True) if is_file} == {"a.txt", "sub/b.txt"}
    storage.copy(run / "a.txt", f"{OUT}/copied/a.txt")
    assert storage.read_text(f"{OUT}/copied/a.txt") == "AA"


def test_resume_and_init_checks_read_uris(s3, tmp_path):
    from reid_ray.cli import train

    for run, stamps in (("baseline-1", ("2026-12-01_10", "2026-12-01_11")), ("baseline-2", ("2026-12-01_09",))):
        time.sleep(1.1 * (run == "baseline-2"))  # S3 keeps whole seconds: baseline-2's checkpoint is written last
        for stamp in stamps:
            _fake_checkpoint(s3, f"{OUT}/{run}/checkpoint_{stamp}/checkpoint.pt")
    newest_of_1 = f"{OUT}/baseline-1/checkpoint_2026-12-01_11"
    assert train.resolve_resume("baseline-1", OUT, "baseline") == newest_of_1               # a run name
    assert train.resolve_resume(f"{OUT}/baseline-1", "outputs", "baseline") == newest_of_1  # a run URI
    ckpt = f"{OUT}/baseline-1/checkpoint_2026-12-01_10"
    assert train.resolve_resume(ckpt, OUT, "baseline") == ckpt                              # a checkpoint URI
    assert train.resolve_resume(True, OUT, "baseline") == f"{OUT}/baseline-2/checkpoint_2026-12-01_09"  # written last
    with pytest.raises(ReidRayError, match="no earlier mmt run"):
        train.resolve_resume(True, OUT, "mmt")
    storage.write_text(f"{OUT}/empty-run/notes.txt", "")
    with pytest.raises(ReidRayError, match="no checkpoint that loads in"):
        train.resolve_resume("empty-run", OUT, "baseline")

    # checked before Ray starts, from a copy of the file (no "./s3:/..." local paths)
    train.check_config(resolve_config("baseline", flags=dict(output=OUT, resume=ckpt)))
    with pytest.raises(ReidRayError, match="no such checkpoint"):
        train.check_config(resolve_config("baseline", flags=dict(output=OUT, resume=f"{OUT}/nothing-here")))
    with pytest.raises(ReidRayError, match="a checkpoint of method 'baseline'"):
        train.check_config(resolve_config("mmt", flags=dict(output=OUT, resume=ckpt)))
    init = f"{ckpt}/checkpoint.pt"
    train.check_config(resolve_config("mmt", flags=dict(output=OUT, init=[init])))
    with pytest.raises(ReidRayError, match="no such checkpoint file"):
        train.check_config(resolve_config("mmt", flags=dict(output=OUT, init=[f"{OUT}/missing.pt"])))


def test_source_model_cache_lives_under_the_uri(s3, monkeypatch):
    from reid_ray.distributed import driver
    from reid_ray.methods import method_class

    _fake_checkpoint(s3, f"{OUT}/pretrain-x/checkpoint_1/checkpoint.pt")
    calls = []

    def fake_training(cfg, **kw):  # the baseline's run, as run_training returns it under a URI --output
        calls.append(cfg)
        return {"metrics": {"target_mAP": 12.5, "note": "text"}, "checkpoint": f"{OUT}/pretrain-x/checkpoint_1"}

    monkeypatch.setattr(driver, "run_training", fake_training)
    cfg = resolve_config("mmt", flags=dict(output=OUT))
    cached = driver.source_pretraining(cfg)
    assert cached.startswith(f"{OUT}/pretrain/baseline-") and cached.endswith(".pt") and len(calls) == 1
    assert storage.is_file(cached) and driver.pretraining_metrics(cached) == {"target_mAP": 12.5}
    assert driver.source_pretraining(cfg) == cached and len(calls) == 1  # cached: not trained again
    # the method's init paths stay URIs; each worker fetches its own copy (worker.py: source_weights(fetch(p)))
    inits = driver.source_inits(cfg)  # the first source model is the cached one; a second (seed + 1) is made as well
    assert inits[0] == cached and all(storage.is_file(p) and p.startswith(f"{OUT}/pretrain/") for p in inits)
    weights = method_class("mmt").source_weights(storage.fetch(inits[0]))
    assert torch.equal(weights["w"], torch.ones(2))


def test_sweep_state_and_summary_under_the_uri(s3, mlflow_uri):
    from reid_ray.cli.tune import build_parser, prepare_sweep
    from reid_ray.config.sweep import Sweep, latest_sweep, sweep_dir
    from reid_ray.tracking import start_run
    from reid_ray.tracking.report import SweepOutcome, TrialRow, finalize_sweep

    uri = mlflow_uri
    base = resolve_config("baseline", flags=dict(output=OUT, mlflow_uri=uri))
    folder = sweep_dir(OUT, "baseline-s1")
    assert folder == f"{OUT}/tune/baseline-s1"
    sweep = Sweep(name="baseline-s1", method="baseline", base=base, space_path="search_spaces/baseline.yaml",
                  space_text="", num_samples=2)
    sweep.save(folder)
    assert Sweep.load(folder).base == base and latest_sweep(OUT, "baseline") == "baseline-s1"
    for argv in (["--resume", "baseline-s1", "--output", OUT], ["--resume", str(folder)], ["--resume", "--output", OUT]):
        resumed = prepare_sweep(build_parser().parse_args(["--method", "baseline", *argv]))
        assert resumed.name == "baseline-s1" and resumed.resumed

    sweep.parent_run_id = start_run(uri, "e", "sweep-baseline-s1", {}, {}, {})
    rows = [TrialRow("t1", {"optim.lr": 1e-4}, "completed", 2, 10.0, 20.0, 30.0),
            TrialRow("t2", {"optim.lr": 5e-4}, "completed", 2, 12.0, 21.0, 31.0)]
    out = finalize_sweep(SweepOutcome(sweep=sweep, rows=rows, folder=folder, uri=uri, trials=2, best_trial="t2"))
    assert out.best_config == f"{folder}/best_config.yaml" and out.best.trial == "t2"
    assert {"best_config.yaml", "summary.md", "parallel_coordinates.png"} <= {
        rel for rel, is_file, _ in storage.listing(folder) if is_file}
    assert "| t2 |" in storage.read_text(folder / "summary.md")


@pytest.mark.ray
def test_train_and_resume_with_output_on_s3(ray_s3, s3, tiny_synth, mlflow_uri, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from reid_ray.cli.train import main

    monkeypatch.chdir(tmp_path)  # where a URI taken for a local folder would appear (./s3:/...)
    uri = mlflow_uri
    common = ["--data-root", str(tiny_synth), "--output", OUT, "--mlflow-uri", uri, "--workers", "1",
              "--set", "num_identities=4", "--set", "checkpoint_upload=sync", "--set", "log_model=false"]
    assert main([*common, "--name", "s3-run", "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    keys = s3.keys("runs/s3-run/")
    checkpoints = sorted({k.split("/")[2] for k in keys if k.endswith("/checkpoint.pt")})
    assert len(checkpoints) == 2 and all(c.startswith("checkpoint_") for c in checkpoints), keys
    assert {"runs/s3-run/best.pt", "runs/s3-run/cmc.png"} <= set(keys), keys
    assert f"checkpoint {OUT}/s3-run/{checkpoints[-1]}" in printed and f"CMC plot in {OUT}/s3-run" in printed
    assert not (tmp_path / "s3:").exists()

    # --resume <run name> under the URI --output: its newest checkpoint, fetched; only epoch 3 runs
    assert main([*common, "--name", "s3-resumed", "--epochs", "3", "--resume", "s3-run"]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("synth-a->synth-b").experiment_id],
                                filter_string="attributes.run_name = 's3-resumed'")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")] == [3.0]
    assert run.data.params["resume"] == f"{OUT}/s3-run/{checkpoints[-1]}"
    (new,) = {k for k in s3.keys("runs/s3-resumed/") if k.endswith("/checkpoint.pt")}
    state = torch.load(storage.fetch(f"s3://{BUCKET}/{new}"), weights_only=True)
    assert state["epoch"] == 2 and state["config"]["epochs"] == 3
