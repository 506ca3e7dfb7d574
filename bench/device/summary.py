"""summary.json and compare.json of a `bench/device/run.sh` run, rewritten after each part (so a run cut off at
its time limit keeps a summary of what ran). Standard library only: it reads the MLflow store with sqlite3, so it
runs whatever the parts before it managed to install.

    python bench/device/summary.py --out OUT_DIR --parts WORK/parts.jsonl --mlflow-db WORK/mlflow.db \
        --sweep-dir WORK/outputs/tune/device-sweep --tiny 0

summary.json: the parts (exit status, wall time, timeout), bench.gpu's record (OUT_DIR/gpu/gpu.json), every
MLflow run (status, wall time, the last value of each metric, and per epoch images_per_s, epoch_time and
refresh_time), the sweep (its trials' runs and best config), and the comparison below.
compare.json: the Ray Train baseline's images/s per epoch beside bench.gpu's bare loop (the same step and loader
in one process, no Ray) in the matching precision, and their ratio; the same run with `model.cuda_graph=true`
beside it and beside the bare loop's captured step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import time
from pathlib import Path

PER_EPOCH = ("images_per_s", "epoch_time", "refresh_time", "target_mAP")


def read_parts(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_runs(db: Path) -> dict:
    """{run name: {...}} from an MLflow SQLite store, or {"error": ...} where it cannot be read."""
    if not db.is_file():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        runs = {}
        for r in con.execute("SELECT r.run_uuid, r.name, r.status, r.start_time, r.end_time, e.name AS experiment "
                             "FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                             "WHERE r.lifecycle_stage = 'active' ORDER BY r.start_time"):
            rid = r["run_uuid"]
            history: dict[str, list] = {}
            for m in con.execute("SELECT key, value, step FROM metrics WHERE run_uuid = ? ORDER BY step, timestamp",
                                 (rid,)):
                history.setdefault(m["key"], []).append((m["step"], m["value"]))
            tags = {t["key"]: t["value"] for t in con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (rid,))}
            entry = {"run_id": rid, "experiment": r["experiment"], "status": r["status"],
                     "wall_s": (r["end_time"] - r["start_time"]) / 1000 if r["end_time"] and r["start_time"] else None,
                     "parent_run_id": tags.get("mlflow.parentRunId"),
                     "last": {k: v[-1][1] for k, v in sorted(history.items())},
                     "per_epoch": {k: [{"step": s, "value": x} for s, x in history[k]] for k in PER_EPOCH if k in history}}
            name = r["name"] or rid
            runs[name if name not in runs else f"{name} ({rid[:8]})"] = entry
        con.close()
        return runs
    except sqlite3.Error as e:
        return {"error": f"{type(e).__name__}: {e}"}


def bare_mode(modes: dict) -> tuple[str | None, dict]:
    """bench.gpu's training mode that a Ray Train run uses: on a GPU bf16 (or fp16) + channels_last, decoded
    on the CPU, no compile (amp=True, reid_ray's defaults); on a CPU fp32."""
    plain = {k: v for k, v in modes.items() if "error" not in v and "compile" not in k and "device" not in k}
    for name in plain:
        if "channels_last" in name:
            return name, plain[name]
    if "fp32" in plain:
        return "fp32", plain["fp32"]
    return None, {}


def compare(gpu: dict, runs: dict) -> dict:
    modes = gpu.get("training", {}).get("modes", {})
    name, bare = bare_mode(modes)
    ray_run = runs.get("baseline-device", {}) if isinstance(runs, dict) else {}
    per_epoch = [e["value"] for e in ray_run.get("per_epoch", {}).get("images_per_s", [])]
    out = {"what": "images/s of the BoT baseline's training epochs: under Ray Train (1 worker, its loader processes, "
                   "reid_ray.train) against bench.gpu's bare loop (one process, the same loader and step, no Ray)",
           "bare_loop_mode": name, "bare_loop_end_to_end_img_s": bare.get("end_to_end_img_s"),
           "bare_loop_step_only_img_s": bare.get("step_only_img_s"),
           "bare_loop_loader_processes": gpu.get("training", {}).get("loader_processes"),
           "ray_train_images_per_s_per_epoch": per_epoch, "ray_train_run_status": ray_run.get("status")}
    if per_epoch and bare.get("end_to_end_img_s"):
        # the last epoch: the first pays for the loader processes' start and cuDNN's autotuning
        out["ray_over_bare"] = per_epoch[-1] / bare["end_to_end_img_s"]
    # the same run with the product's captured step (`--set model.cuda_graph=true`), beside the bare loop's
    # captured mode (bench.gpu, the same CapturedStep class)
    graph_run = runs.get("baseline-graph-device", {}) if isinstance(runs, dict) else {}
    graph_epochs = [e["value"] for e in graph_run.get("per_epoch", {}).get("images_per_s", [])]
    captured = next((v for k, v in modes.items() if "captured" in k and "error" not in v), {})
    out.update({"ray_train_cuda_graph_images_per_s_per_epoch": graph_epochs,
                "ray_train_cuda_graph_run_status": graph_run.get("status"),
                "bare_loop_captured_end_to_end_img_s": captured.get("end_to_end_img_s")})
    if graph_epochs and per_epoch:
        out["cuda_graph_over_eager_ray"] = graph_epochs[-1] / per_epoch[-1]
    return out


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", required=True)
    ap.add_argument("--mlflow-db", required=True)
    ap.add_argument("--sweep-dir", default=None)
    ap.add_argument("--tiny", default="0")
    a = ap.parse_args(argv)
    out = Path(a.out)
    gpu_json = out / "gpu" / "gpu.json"
    gpu = json.loads(gpu_json.read_text()) if gpu_json.is_file() else {}
    runs = read_runs(Path(a.mlflow_db))
    summary = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "tiny": a.tiny == "1",
               "device": gpu.get("versions", {}).get("device"), "parts": read_parts(Path(a.parts)),
               "compare": compare(gpu, runs), "runs": runs, "gpu": gpu}
    sweep = Path(a.sweep_dir) if a.sweep_dir else None
    if sweep is not None and sweep.is_dir():
        best = sweep / "best_config.yaml"
        summary["sweep"] = {"folder": str(sweep), "files": sorted(p.name for p in sweep.iterdir()),
                            "best_config": best.read_text() if best.is_file() else None}
    write_json(out / "compare.json", summary["compare"])
    write_json(out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
