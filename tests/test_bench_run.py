"""`make bench`'s driver (bench/run.py): its tables, plots and the generated section of RESULTS.md. Nothing
here is timed: the figures are whatever this machine gives; the test checks what is written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench import run

ROOT = Path(__file__).resolve().parent.parent


def test_a_quick_run_rewrites_only_its_own_section_and_draws_its_plot(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\npreamble\n\n## Older figures\n\nkept\n")
    for _ in range(2):  # the second run replaces the first run's section instead of adding another
        run.main(["--quick", "--only", "kmeans", "--results", str(results)])
    text = results.read_text()
    assert text.count(run.BEGIN) == 1 and text.count(run.END) == 1
    assert text.index("preamble") < text.index(run.BEGIN) < text.index("## Older figures")
    assert "kept" in text and "### k-means: faiss (the refresh's) vs scikit-learn" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1,500 × 256, k = 100 |"))
    assert "failed" not in row and row.count(" s (1 run)") == 2 and row.rstrip().endswith("× |")
    assert (tmp_path / "bench-kmeans.png").stat().st_size > 1000
    # a run of another section adds it and keeps k-means' figures
    run.write_results(["## `make bench`", ""], {"dbscan": ["### DBSCAN", "", "| 1 | 2 |"]}, results)
    text2 = results.read_text()
    assert row in text2 and "### DBSCAN" in text2 and text2.count(run.BEGIN) == 1
    assert text2.index("k-means: faiss") < text2.index("### DBSCAN") < text2.index("## Older figures")


def test_a_figure_names_its_spread_and_a_loaded_machine(monkeypatch):
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    assert run._fig({"times": [1.0, 3.0, 2.0], "others": 0.1, "load": 2.5}) == "2.00 s (1.00-3.00, 3 runs)"
    assert run._fig({"times": [70.0], "others": 0.8, "load": 0.5}) == "70.00 s (1 run) LOADED"
    assert run._fig({"error": "no Cython", "others": 0}) == "failed: no Cython"


def test_loaded_counts_other_processes_not_the_figures_own(monkeypatch):
    """Other processes' cores = (the machine's busy CPU time - the figure's own) / wall; the figure's own CPU
    time (a child that does a fixed amount of work) is seen through its rusage."""
    before = run._own_cpu_s()
    subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True)
    assert run._own_cpu_s() - before > 0.3  # the child's CPU seconds, whatever else the machine runs
    busy, own, clock = iter([100.0, 103.0]), iter([5.0, 6.5]), iter([0.0, 1.5])
    monkeypatch.setattr(run, "_busy_cpu_s", lambda: next(busy))
    monkeypatch.setattr(run, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(run.time, "perf_counter", lambda: next(clock))
    _, seen = run._run([sys.executable, "-c", "pass"])
    assert seen["others"] == 1.0 and run._loaded(seen) == " LOADED"  # 3 s busy, 1.5 s of it the figure's


def test_an_unknown_section_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--only", "evall"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "evall" in proc.stderr


def test_the_pipeline_section_names_the_bound(tmp_path, tiny_synth):
    """A real (quick) run of the loader-against-step section, on the tests' small benchmark."""
    lines = run.section_pipeline(1, tmp_path, quick=True, data_root=str(tiny_synth), sets=("loader.num_identities=4",))
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

    monkeypatch.setattr(run, "_script", fake)
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(run, "MMT_SIZES", [("data", 150, 100), ("data", 300, 200)])
    mmt = run.section_mmt(tmp_path, quick=False)
    assert "| 1,500 | 100 | 1.50 s | 0.10 / 0.02 / 0.01 s | 20.00 s | 7.0 % | 0.8 % |" in mmt
    # the second size starts from the first's source model
    assert calls[1][1][-2:] == ["--init", "/src.pt"] and "--init" not in calls[0][1]
    assert (tmp_path / "bench-mmt.png").stat().st_size > 1000
    over = run.section_overhead(tmp_path)
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
    monkeypatch.setattr(run, "_script", lambda module, args, env=None, timeout=0: record)
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    over = run.section_overhead(tmp_path)
    row = next(line for line in over if line.startswith("| passive (default) |"))
    assert "| **+20.0 %** | 1.50; 1.30 + 0.22 |" in row  # Ray's own 0.9 cores of "others" are not LOADED
    cores["ray"]["other"] = 0.6
    assert "**+20.0 %** LOADED |" in run.section_overhead(tmp_path)[-4]


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
