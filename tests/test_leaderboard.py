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


def test_a_carried_rows_footnote_survives_a_rewrite(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    row = "| MMT from SAN source models\\* | 3 | 71.0 ± 1.0 | 79.1 ± 0.6 | +12.4\\* | 63.0 | 191 s | 69.8 / 71.3 / 71.7 |"
    note = "\\* Run on 2026-12-02, after the other rows'\nrecords had been lost."
    lb.update_results("data", f"header\n\n{row}\n\n{note}\n\n![leaderboard data](leaderboard-data.png)", results)
    carried = row.replace("models\\*", "models\\*†")
    lb.update_results("data", f"new header\n\n{carried}\n\n![leaderboard data](leaderboard-data.png)", results)
    text = results.read_text()
    assert "new header" in text and text.count(note) == 1
    assert text.index(carried) < text.index(note) < text.index("![leaderboard data]")
    # once no row carries the mark, its note goes
    lb.update_results("data", "newer header\n\n| ECN | 3 |\n\n![leaderboard data](leaderboard-data.png)", results)
    assert note not in results.read_text()


def test_rows_not_rerun_keep_their_committed_line_and_plot_from_its_seeds(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n")
    committed = ("| method | seeds | target mAP | target R1 | − AdaBN | source mAP | wall time / run | target mAP per seed |\n"
                 "|---|---|---|---|---|---|---|---|\n"
                 "| ECN | 3 | 68.7 ± 3.8 | 76.9 ± 3.5 | +9.6 | 75.2 | 105 s | 69.2 / 64.6 / 72.2 |\n"
                 "| MAR | 3 | 67.1 ± 1.6 | 75.9 ± 3.2 | +8.1 | 75.7 | 160 s | 66.1 / 66.4 / 68.9 |\n"
                 "| MMT from SAN source models\\* | 3 | 71.0 ± 1.0 | 79.1 ± 0.6 | +12.4\\* | 63.0 | 191 s "
                 "| 69.8 / 71.3 / 71.7 |\n"
                 "| SpCL | 0 | not run | | | | | |")
    lb.update_results("data", committed, results_md)
    carried = lb.committed_lines("data", results_md)
    assert set(carried) == {"ecn", "mar", "san-mmt"}       # "not run" is nothing to keep
    assert lb.carried_seeds(carried["san-mmt"]) == [69.8, 71.3, 71.7]
    # MAR rerun: its records win, the others are carried with their numbers and a †
    results = {"mar": [{"target_mAP": 73.0, "target_R1": 80.0, "source_mAP": 70.0, "wall_time": 300.0}]}
    del carried["mar"]
    md, stats = lb.table([r for r in lb.ROWS if r.key in {"ecn", "mar", "san-mmt", "spcl"}], results, carried)
    lines = md.splitlines()
    assert "| ECN† | 3 | 68.7 ± 3.8 | 76.9 ± 3.5 | +9.6 | 75.2 | 105 s | 69.2 / 64.6 / 72.2 |" in lines
    assert any(line.startswith("| MMT from SAN source models\\*† | 3 | 71.0 ± 1.0") for line in lines)
    assert any(line.startswith("| MAR | 1 | 73.0 ± 0.0") for line in lines)
    assert "| SpCL | 0 | not run | | | | | |" in lines
    assert abs(stats["ecn"][0] - 68.6667) < 1e-3
    # a rewritten section can be carried again without a second †
    lb.update_results("data", md, results_md)
    assert lb.committed_lines("data", results_md)["ecn"].startswith("| ECN† |")
    md2, _ = lb.table([r for r in lb.ROWS if r.key == "ecn"], {}, lb.committed_lines("data", results_md))
    assert "| ECN† | 3 |" in md2 and "††" not in md2
    # a rerun row's gain is against the carried AdaBN when AdaBN itself was not rerun
    adabn = ("| AdaBN (baseline + target BN statistics) | 3 | 59.1 ± 3.2 | 70.1 ± 2.7 |  | 93.3 | (its baseline's) "
             "| 57.0 / 57.4 / 62.9 |")
    md3, _ = lb.table([r for r in lb.ROWS if r.key in {"adabn", "mar"}], results, {"adabn": adabn})
    assert any(line.startswith("| MAR | 1 | 73.0 ± 0.0 | 80.0 ± 0.0 | +13.9 |") for line in md3.splitlines())
    png = tmp_path / "board.png"
    lb.plot(lb.ROWS, results, png, "test", carried)
    assert png.stat().st_size > 1000
