"""`make bench`: its driver (bench/run.py), the harness every benchmark shares (bench/harness.py: the timer,
the process runner, the RESULTS.md writer) and the sections' tables and plots (each in its benchmark file).
Nothing here is timed: the figures are whatever this machine gives; the test checks what is written."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import (
    bench_clustering,
    bench_evaluation,
    bench_pipeline,
    bench_ray_overhead,
    bench_refresh,
    bench_rerank,
    harness,
    run,
)

ROOT = Path(__file__).resolve().parent.parent


def test_a_quick_run_rewrites_only_its_own_section_and_draws_its_plot(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\npreamble\n\n## Older figures\n\nkept\n")
    for _ in range(2):  # the second run replaces the first run's section instead of adding another
        run.main(["--quick", "--only", "kmeans", "--results", str(results)])
    text = results.read_text()
    assert text.count(harness.BEGIN) == 1 and text.count(harness.END) == 1
    assert text.index("preamble") < text.index(harness.BEGIN) < text.index("## Older figures")
    assert "kept" in text and "### k-means: faiss (the refresh's) vs scikit-learn" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1,500 × 256, k = 100 |"))
    assert "failed" not in row and row.count(" s (1 run)") == 2 and row.rstrip().endswith("× |")
    assert (tmp_path / "bench-kmeans.png").stat().st_size > 1000
    # a run of another section adds it and keeps k-means' figures
    harness.write_results(["## `make bench`", ""], {"dbscan": ["### DBSCAN", "", "| 1 | 2 |"]}, tuple(run.SECTIONS),
                          results)
    text2 = results.read_text()
    assert row in text2 and "### DBSCAN" in text2 and text2.count(harness.BEGIN) == 1
    assert text2.index("k-means: faiss") < text2.index("### DBSCAN") < text2.index("## Older figures")


def test_a_figure_names_its_spread_and_a_loaded_machine(monkeypatch):
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    assert harness.fig({"times": [1.0, 3.0, 2.0], "others": 0.1, "load": 2.5}) == "2.00 s (1.00-3.00, 3 runs)"
    assert harness.fig({"times": [70.0], "others": 0.8, "load": 0.5}) == "70.00 s (1 run) LOADED"
    assert harness.fig({"error": "no Cython", "others": 0}) == "failed: no Cython"


def test_loaded_counts_other_processes_not_the_figures_own(monkeypatch):
    """Other processes' cores = (the machine's busy CPU time - the figure's own) / wall; the figure's own CPU
    time (a child that does a fixed amount of work) is seen through its rusage."""
    before = harness.own_cpu_s()
    subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True)
    assert harness.own_cpu_s() - before > 0.3  # the child's CPU seconds, whatever else the machine runs
    busy, own, clock = iter([100.0, 103.0]), iter([5.0, 6.5]), iter([0.0, 1.5])
    monkeypatch.setattr(harness, "busy_cpu_s", lambda: next(busy))
    monkeypatch.setattr(harness, "own_cpu_s", lambda: next(own))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    _, seen = harness.run_process([sys.executable, "-c", "pass"])
    assert seen["others"] == 1.0 and harness.loaded(seen) == " LOADED"  # 3 s busy, 1.5 s of it the figure's


def test_an_unknown_section_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--only", "evall"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "evall" in proc.stderr


def test_the_pipeline_section_names_the_bound(tmp_path, tiny_synth):
    """A real (quick) run of the loader-against-step section, on the tests' small benchmark."""
    lines = bench_pipeline.section_pipeline(1, tmp_path, quick=True, data_root=str(tiny_synth),
                                            sets=("loader.num_identities=4",))
    row = next(line for line in lines if line.startswith("| embedded (64×32) | small |"))
    assert "failed" not in row and row.count("img/s") == 2 and ("**loader**" in row or "**step**" in row)


def test_the_ray_sections_tabulate_their_scripts_records(tmp_path, monkeypatch):
    """The MMT and overhead sections read their scripts' JSON records (canned here: those scripts train under
    Ray for minutes; they are run by make bench, not by the suite)."""
    calls = []

    def fake(module, args, env=None, timeout=0):
        calls.append((module, args, env))
        if module == "bench.bench_refresh":
            n = 1500 if "data" in args else 3000
            return {"target_images": n, "refresh_time": n / 1000, "pseudo_gather_time": 0.1, "pseudo_cluster_time": 0.02,
                    "pseudo_return_time": 0.01, "epoch_time": 20.0, "share": 0.07, "projected_at_400": 0.008,
                    "init": "/src.pt", "others": 0.1}
        return {"bare_s": 4.0, "ray_s": 4.2, "bare_epochs": [5, 4, 4, 4], "ray_epochs": [6, 4.2, 4.1, 4.3],
                "overhead": 0.05, "wall_s": 40.0, "fixed_s": 22.0, "others": 0.9}

    monkeypatch.setattr(harness, "script", fake)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench_refresh, "MMT_SIZES", [("data", 150, 100), ("data", 300, 200)])
    mmt = bench_refresh.section_mmt(1, tmp_path, quick=False)
    assert "| 1,500 | 100 | 1.50 s | 0.10 / 0.02 / 0.01 s | 20.00 s | 7.0 % | 0.8 % |" in mmt
    # the second size starts from the first's source model
    assert calls[1][1][-2:] == ["--init", "/src.pt"] and "--init" not in calls[0][1]
    assert (tmp_path / "bench-mmt.png").stat().st_size > 1000
    over = bench_ray_overhead.section_overhead(1, tmp_path)
    assert any(line.startswith("| GOMP_SPINCOUNT=10000 | 4.00 s (4.00-4.00) | 4.20 s (4.10-4.30) | **+5.0 %** LOADED")
               for line in over)
    assert calls[-2][2] == {"GOMP_SPINCOUNT": "10000"} and calls[-3][2] == {} and calls[-1][1][-2:] == ["--threads", "1"]


def test_the_overhead_section_shows_who_used_the_cores(tmp_path, monkeypatch):
    """With bench_ray_overhead's per-class cores, the row shows the bare loop's cores and the Ray worker's +
    Ray's other processes'; LOADED counts only processes outside the benchmark and Ray."""
    cores = {"bare": {"driver": 1.5, "other": 0.01}, "ray": {"driver": 0.04, "ray actors": 0.11, "ray daemons": 0.07,
                                                            "train worker": 1.3, "other": 0.02}}
    record = {"bare_s": 4.0, "ray_s": 4.8, "bare_epochs": [5, 4, 4, 4], "ray_epochs": [6, 4.8, 4.8, 4.8],
              "overhead": 0.2, "wall_s": 40.0, "fixed_s": 22.0, "others": 0.9, "cores": cores}
    monkeypatch.setattr(harness, "script", lambda module, args, env=None, timeout=0: record)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    over = bench_ray_overhead.section_overhead(1, tmp_path)
    row = next(line for line in over if line.startswith("| passive (default) |"))
    assert "| **+20.0 %** | 1.50; 1.30 + 0.22 |" in row  # Ray's own 0.9 cores of "others" are not LOADED
    cores["ray"]["other"] = 0.6
    assert "**+20.0 %** LOADED |" in bench_ray_overhead.section_overhead(1, tmp_path)[-4]


def test_process_cpu_classes_processes_and_sees_a_childs_cpu_time():
    from bench.proc_cpu import ProcessCPU, classify

    assert classify(os.getpid(), "python -m bench.x") == "driver"
    assert classify(1, "ray::_RayTrainWorker__execute.get_next") == "train worker"
    assert classify(1, "ray::TrainController.run") == "ray actors"
    assert classify(1, "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node") == "ray daemons"
    assert classify(1, "sshd: user") == "other"
    with ProcessCPU(interval=0.05) as cpu:
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True)
        t1 = time.time()
    seen = cpu.cores(t0, t1)
    assert seen["other"] * (t1 - t0) > 0.3  # the child's CPU seconds, which it keeps after it exits


def test_the_timer_keeps_every_run_its_median_spread_and_value():
    """harness.timed, every benchmark's: a warm-up run outside the figure unless refused, sync around each clock
    read, and a first run over `enough_s` as the figure alone."""
    calls = []
    t = harness.timed(lambda: calls.append("run") or calls.count("run"), 3, sync=lambda: calls.append("sync"))
    assert calls == ["run"] + ["sync", "run", "sync"] * 3 and t.out == 4 and len(t.times) == 3
    assert t.median == sorted(t.times)[1] and t.spread == max(t.times) - min(t.times)
    assert len(harness.timed(lambda: time.sleep(0.02), 5, warmup=False, enough_s=0.01).times) == 1


def test_a_measurement_runs_in_its_own_process_and_a_failure_is_one_line():
    """harness.child runs a bench file's measure_* function in a fresh process and reads back its JSON record."""
    r = harness.child(bench_rerank.measure_rerank, {"q": 20, "g": 60, "structure": "unstructured", "impl": "ours",
                                                    "repeats": 2})
    assert len(r["times"]) == 2 and r["inputs_gib"] > 0 and "others" in r and "error" not in r
    bad = harness.script("bench.harness", ["bench.harness:no_such_measurement", "{}"])  # fails fast: no imports
    assert bad["error"].startswith("AttributeError") and "\n" not in bad["error"]


def test_the_measured_sections_tabulate_their_childrens_records(tmp_path, monkeypatch):
    """The eval, rerank and dbscan sections' rows from their measurements' records (canned here: the real ones
    run for minutes in make bench; the child test above runs one for real)."""
    def fake(fn, p, timeout=0):
        if fn.__name__ == "measure_rerank" and p["impl"] == "reference":
            return {"times": [4.0], "others": 0.0}
        rec = {"times": [1.0, 2.0, 3.0] if p.get("impl") != "cython" else [4.0], "others": 0.0}
        return {**rec, "mAP": 0.5, "cmc": [0.6, 0.7], "inputs_gib": 0.03, "peak_above_gib": 0.1, "clusters": 12}

    monkeypatch.setattr(harness, "child", fake)
    monkeypatch.setattr(bench_evaluation, "EVAL_SIZES", [(50, 200), (3368, 15913)])
    ev = bench_evaluation.section_eval(3, tmp_path)
    assert "| 50 × 200 | 2.00 s (1.00-3.00, 3 runs) | 4.00 s (1 run) | 2.00× | 0.0e+00 / 0.0e+00 |" in ev
    assert any(line.startswith("| 3,368 × 15,913, one match a query at 1e3 |") for line in ev)
    monkeypatch.setattr(bench_rerank, "RERANK_SIZES", [(50, 200), (3368, 15913)])
    rr = bench_rerank.section_rerank(3, tmp_path)
    ours = "2.00 s (1.00-3.00, 3 runs) | 0.10 GiB (inputs 0.03)"
    assert f"| clustered | 50 × 200 | {ours} | 4.00 s (1 run) | 2.00× | - |" in rr
    assert f"| unstructured | 3,368 × 15,913 | {ours} | not run | - | - |" in rr  # the dense reference: too big
    db = bench_clustering.section_dbscan(3, tmp_path, quick=True)
    assert "| 1,500 | 2.00 s (1.00-3.00, 3 runs) | 12 |" in db
    assert all((tmp_path / f"bench-{name}.png").stat().st_size > 1000 for name in ("eval", "rerank", "dbscan"))


# bench/gpu.py runs on a GPU lease as one script (bench/device/run.sh); every other file is the harness, the driver
# or one benchmark with its make bench section, and 300 lines holds the largest of those (bench/leaderboard.py's
# training, table, plot and RESULTS section) with room to spare: a file growing past it is holding a second job.
MAX_LINES = 300


def test_bench_has_one_timer_and_small_files():
    files = sorted([*(ROOT / "bench").glob("*.py"), *(ROOT / "bench" / "device").glob("*.py")])
    timers = [f"{f.name}:{node.lineno}" for f in files for node in ast.walk(ast.parse(f.read_text()))
              if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in ("timed", "_timed")]
    assert timers == [f"harness.py:{harness.timed.__code__.co_firstlineno}"]
    big = {f.name: n for f in files if f.name != "gpu.py" and (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"over {MAX_LINES} lines: {big}"


def test_the_selection_bench_scores_regret_against_its_baselines_by_hand():
    """bench/bench_selection.py's analysis on four made-up trials: target mAP 50, 60, 40, 70 at the last epoch
    (oracle 70). A score that ranks them exactly (τ = ρ = 1) has regret 0; one that picks trial 2 (mAP 40) has 30.
    Random pick: 70 − mean 55 = 15; the default (trial 0): 20; the epoch number: the best of every (trial, epoch),
    72 at an earlier epoch, − 55 = 17."""
    from bench.bench_selection import analyse

    maps, probe = [50, 60, 40, 70], [1.0, 2.0, 9.0, 3.0]
    recs = [{"trial": i, "epochs": {"2": {"target_mAP": 72.0 if i == 3 else 10.0},
                                    "4": {"target_mAP": m, "source_val_mAP": m / 10, "target_probe": p}}}
            for i, (m, p) in enumerate(zip(maps, probe, strict=True))]
    rows, info = analyse(recs)
    assert {k: info[k] for k in ("epoch", "oracle", "trials", "mean")} == {"epoch": 4, "oracle": 70.0, "trials": 4,
                                                                           "mean": 55.0}
    assert info["regret"]["source_val_mAP"] == 0.0 and info["regret"]["target_probe"] == 30.0
    assert abs(info["tau"]["source_val_mAP"] - 1.0) < 1e-9
    # the rule for the default label-free metric: the lowest mean regret over the default benchmark's methods
    from bench.bench_selection import rule

    other = {**info, "regret": {"source_val_mAP": 10.0, "target_probe": 0.0}, "tau": {"source_val_mAP": 0.2,
                                                                                      "target_probe": 0.1}}
    line = rule({"mmt": info, "spcl": other})[0]
    assert line.endswith("Chosen: `source_val_mAP`.") and "`target_probe` mean regret 15.0, mean τ" in line
    assert rows[0] == "| `source_val_mAP` | +1.00 | +1.00 | 0.0 |"
    assert rows[1].startswith("| `target_probe` |") and rows[1].endswith("| 30.0 |")
    assert rows[-3:] == ["| random pick (expected) | | | 15.0 |", "| default config (trial 0) | | | 20.0 |",
                         "| epoch number (last epoch, trials tied) | | | 17.0 |"]


def test_the_selection_bench_scores_agreement_from_the_features_kept_beside_its_records(tmp_path):
    """A new checkout has no bench/out/: the ensemble agreement is then computed from the last evaluation's probe
    features kept beside each record, and only at that epoch (the earlier epochs' features are gone)."""
    import numpy as np

    from bench.bench_selection import features_path, with_agreement

    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 16)).astype(np.float16)
    recs = []
    for i in range(3):
        kept = tmp_path / f"mmt-t{i}.npy"
        np.save(kept, base + 0.1 * i * rng.standard_normal((64, 16)).astype(np.float16))
        recs.append({"trial": i, "features": {e: str(tmp_path / "gone" / f"epoch{e}.npy") for e in ("2", "4")},
                     "kept_features": {"epoch": "4", "path": str(kept)},
                     "epochs": {"2": {"target_mAP": 1.0}, "4": {"target_mAP": 2.0}}})
    assert features_path(recs[0], "4") == tmp_path / "mmt-t0.npy"
    assert features_path(recs[0], "2") == tmp_path / "gone" / "epoch2.npy"
    with_agreement(recs)
    assert all("ensemble_agreement" not in r["epochs"]["2"] for r in recs)
    scores = [r["epochs"]["4"]["ensemble_agreement"] for r in recs]
    assert all(np.isfinite(scores)) and scores[0] >= scores[2]  # the trial nearest the consensus agrees most
