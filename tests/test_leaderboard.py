"""bench/leaderboard.py's table, plot and RESULTS.md section from finished records (no training)."""

import json

from bench import leaderboard as lb


def _records(folder, rows):
    for key, maps in rows.items():
        for seed, m in enumerate(maps):
            rec = {"target_mAP": m, "target_R1": m + 8, "source_mAP": 90.0, "wall_time": 100.0 + seed, "curve": []}
            (folder / f"{key}-s{seed}.json").write_text(json.dumps(rec))


def test_table_means_gains_and_rows_not_run(tmp_path):
    results = {"adabn": [{"target_mAP": 58.0, "target_R1": 66.0, "source_mAP": 93.0, "wall_time": None},
                         {"target_mAP": 60.0, "target_R1": 68.0, "source_mAP": 93.0, "wall_time": None}],
               "mmt-dbscan": [{"target_mAP": 70.0, "target_R1": 78.0, "source_mAP": 80.0, "wall_time": 300.0},
                              {"target_mAP": 74.0, "target_R1": 82.0, "source_mAP": 82.0, "wall_time": 310.0}]}
    md, stats = lb.table(lb.ROWS, results)
    row = next(line for line in md.splitlines() if line.startswith("| MMT, DBSCAN"))
    assert "72.0 ± 2.8" in row and "+13.0" in row and "305 s" in row and "70.0 / 74.0" in row
    assert stats["mmt-dbscan"][0] == 72.0
    assert "| ECN | 0 | not run" in md
    png = tmp_path / "board.png"
    lb.plot(lb.ROWS, results, png, "test")
    assert png.stat().st_size > 1000


def test_results_section_is_replaced_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nbefore\n")
    lb.update_results("data", "table one", results)
    lb.update_results("data", "table two", results)
    lb.update_results("data-g1", "other benchmark", results)
    text = results.read_text()
    assert text.count("<!-- leaderboard:data -->") == 1 and "table two" in text and "table one" not in text
    assert "other benchmark" in text and text.startswith("# Benchmark results\n\nbefore")
