"""bench/device/run.sh --tiny runs on this CPU: every part of the GPU box's one command (the tiny Market-shaped
set, bench.gpu, the baseline and MMT under Ray Train, a 2-trial Tune sweep) ends with exit 0, and summary.json
holds their figures. The kit's real run is on a GPU box (bench/device/README.md); this checks the script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.ray, pytest.mark.faults]  # 193 s on 2 cores (five Ray runs): `make test-quick` skips it


@pytest.mark.budget(200)  # five Ray runs
def test_device_kit_runs_tiny_on_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # this interpreter's environment (Ray, MLflow, Optuna, faiss installed): run.sh needs no bundle then
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable, "DEVICE_WORK": str(work)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(ROOT / "bench/device/run.sh"), str(out), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    parts = {p["part"]: p for p in s["parts"]}
    assert set(parts) == {"synth", "gpu", "baseline", "mmt", "tune"}, parts
    failed = {name: p for name, p in parts.items() if p["rc"] != 0}
    assert not failed, f"{failed}\n{(out / 'run.log').read_text()[-6000:]}"
    # bench.gpu's record, and the baseline under Ray Train beside its bare loop
    assert s["gpu"]["training"]["modes"]["fp32"]["end_to_end_img_s"] > 0
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["bare_loop_mode"] == "fp32" and len(cmp["ray_train_images_per_s_per_epoch"]) == 2
    assert cmp["ray_over_bare"] > 0
    runs = s["runs"]
    assert runs["baseline-device"]["status"] == "FINISHED" and runs["baseline-device"]["last"]["target_mAP"] >= 0
    mmt = runs["mmt-device"]
    assert mmt["status"] == "FINISHED" and len(mmt["per_epoch"]["refresh_time"]) == 1
    trials = [r for r in runs.values() if r.get("parent_run_id")]  # ASHA may stop one after its first epoch
    assert len(trials) == 2 and all(t["status"] in ("FINISHED", "KILLED") for t in trials), trials
    assert all(t["last"]["images_per_s"] > 0 and t["last"]["refresh_time"] > 0 for t in trials)
    assert s["sweep"]["best_config"]
    # what the device tool brings back: at most 8 files, at most 2 folders down
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert (out / "mlflow.db").is_file() and (out / "gpu" / "gpu.md").is_file()
