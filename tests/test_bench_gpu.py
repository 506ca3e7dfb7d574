"""bench/gpu.py runs end to end on a CPU with --tiny: every section, its JSON and its Markdown table."""

import json


def test_gpu_bench_tiny_runs_on_cpu(tmp_path):
    from bench import gpu

    rec = gpu.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["versions"]["torch"] == rec["versions"]["torch"]
    tr = saved["training"]
    assert tr["modes"]["fp32"]["end_to_end_img_s"] > 0 and tr["modes"]["fp32"]["step_only_img_s"] > 0
    assert tr["loader_only_0_processes_img_s"] > 0 and tr[f"loader_only_{tr['loader_processes']}_processes_img_s"] > 0
    assert tr[f"loader_only_{tr['loader_processes']}_processes_device_decode_img_s"] > 0
    assert tr["modes"]["fp32, decode on the device"]["end_to_end_img_s"] > 0
    assert saved["mmt"]["iters"] == 4 and 0 < saved["mmt"]["refresh_share"] < 1
    assert saved["kmeans"]["cpu_s"] > 0 and saved["eval"]["re_ranking_cpu_s"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "| one MMT epoch" in md and "faiss k-means" in md and "loader alone, 0 processes" in md
    assert "(decode + augment on the device)" in md and "fp32, decode on the device, end to end" in md
    assert "k-reciprocal re-ranking 60 x 300, CPU" in md


def test_gpu_bench_loader_only(tmp_path):
    from bench import gpu

    rec = gpu.main(["--tiny", "--loader-only", "--out", str(tmp_path)])
    assert rec["loader"]["0_processes_img_s"] > 0 and len([k for k in rec["loader"] if k.endswith("img_s")]) == 3
    assert (tmp_path / "loader.json").is_file()


def test_gpu_bench_sections_saved_one_by_one(tmp_path):
    """--sections times only those, in that order, and the table holds just what was measured."""
    import pytest

    from bench import gpu

    rec = gpu.main(["--tiny", "--sections", "kmeans", "eval", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert "training" not in saved and "mmt" not in saved and saved["kmeans"]["cpu_s"] > 0
    assert saved["argv"] == rec["argv"] and "--sections kmeans eval" in saved["argv"]
    md = (tmp_path / "gpu.md").read_text()
    assert "faiss k-means" in md and "MMT" not in md and "training" not in md
    with pytest.raises(SystemExit):
        gpu.main(["--tiny", "--sections", "kmean", "--out", str(tmp_path)])


def test_gpu_bench_step_profile(tmp_path):
    """The step alone at two batch sizes, and the fixed per-step cost fitted from them."""
    from bench import gpu

    rec = gpu.main(["--tiny", "--sections", "profile", "--out", str(tmp_path)])
    pr = rec["profile"]
    assert sorted(pr["batches"]) == [16, 64] and all(b["step_only_img_s"] > 0 for b in pr["batches"].values())
    t16, t64 = pr["batches"][16]["step_ms"], pr["batches"][64]["step_ms"]
    assert abs(pr["fixed_ms"] - (t16 - (t64 - t16) / 48 * 16)) < 1e-9
    assert "the step's fixed cost" in (tmp_path / "gpu.md").read_text()
