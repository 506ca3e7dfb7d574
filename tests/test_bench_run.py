"""`make bench`'s driver (bench/run.py): its tables, plots and the generated section of RESULTS.md. Nothing
here is timed: the figures are whatever this machine gives; the test checks what is written."""

from __future__ import annotations

import subprocess
import sys
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
    assert run._fig({"times": [1.0, 3.0, 2.0], "load": 0.5}) == "2.00 s (1.00-3.00, 3 runs)"
    assert run._fig({"times": [70.0], "load": 2.5}) == "70.00 s (1 run) LOADED"
    assert run._fig({"error": "no Cython", "load": 0}) == "failed: no Cython"
    assert run._ratio({"times": [4.0]}, {"times": [2.0]}) == "2.00×"


def test_an_unknown_section_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--only", "evall"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "evall" in proc.stderr
