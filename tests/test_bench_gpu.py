"""bench/gpu.py runs end to end on a CPU with --tiny: every section, its JSON and its Markdown table."""

import json

import pytest


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """The tiny Market-shaped set, written once for the module's runs (each would write its own)."""
    from bench import gpu

    return str(gpu.market_data(tmp_path_factory.mktemp("market"), gpu.Sizes(tiny=True)))


def test_gpu_bench_tiny_runs_on_cpu(tmp_path, market):
    from bench import gpu

    rec = gpu.main(["--tiny", "--out", str(tmp_path), "--data", market])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["versions"]["torch"] == rec["versions"]["torch"]
    tr = saved["training"]
    assert tr["modes"]["fp32"]["end_to_end_img_s"] > 0 and tr["modes"]["fp32"]["step_only_img_s"] > 0
    assert tr["loader_only_0_processes_img_s"] > 0 and tr[f"loader_only_{tr['loader_processes']}_processes_img_s"] > 0
    assert tr[f"loader_only_{tr['loader_processes']}_processes_device_decode_img_s"] > 0
    assert tr[f"loader_only_{tr['loader_processes']}_processes_float32_img_s"] > 0  # the old batches, for comparison
    assert tr["modes"]["fp32, decode on the device"]["end_to_end_img_s"] > 0
    assert saved["mmt"]["iters"] == 4 and 0 < saved["mmt"]["refresh_share"] < 1
    assert saved["kmeans"]["cpu_s"] > 0 and saved["eval"]["re_ranking_cpu_s"] > 0
    km = saved["kmeans"]  # the torch engine, at the objective of faiss's (random data: no structure to find)
    assert km["torch_cpu_s"] > 0 and abs(km["torch_cpu_objective"] / km["cpu_objective"] - 1) < 0.05
    split = saved["mmt"]["split_ms"]
    assert set(split) == {"data", "forward_and_losses", "backward", "optimiser", "mean_nets"} and min(split.values()) > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "| one MMT epoch" in md and "k = 10, faiss CPU" in md and "k = 10, torch CPU" in md
    assert "loader alone, 0 processes" in md and "float32 batches, normalised in the loader" in md
    assert "| MMT iteration split" in md
    assert "(decode + augment on the device; uint8 batches)" in md and "fp32, decode on the device, end to end" in md
    assert "k-reciprocal re-ranking 60 x 300, CPU" in md
    # the captured step's check (its CPU stand-in here): the same parameters after two epochs, MMT recaptured never
    g = saved["graphcheck"]
    assert not g["captured"] and g["baseline"]["max_param_diff"] == g["mmt"]["max_param_diff"] == 0
    assert g["baseline"]["loss_captured"] == g["baseline"]["loss_uncaptured"] and g["mmt"]["captures"] == 1
    assert "mmt, step captured in one CUDA graph (CPU stand-in)" in md


def test_gpu_bench_loader_only(tmp_path, market):
    from bench import gpu

    rec = gpu.main(["--tiny", "--loader-only", "--out", str(tmp_path), "--data", market])
    assert rec["loader"]["0_processes_img_s"] > 0 and len([k for k in rec["loader"] if k.endswith("img_s")]) == 4
    assert (tmp_path / "loader.json").is_file()


def test_gpu_bench_sections_saved_one_by_one(tmp_path, market):
    """--sections times only those, in that order, and the table holds just what was measured."""
    from bench import gpu

    rec = gpu.main(["--tiny", "--sections", "kmeans", "eval", "--out", str(tmp_path), "--data", market])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert "training" not in saved and "mmt" not in saved and saved["kmeans"]["cpu_s"] > 0
    assert saved["argv"] == rec["argv"] and "--sections kmeans eval" in saved["argv"]
    md = (tmp_path / "gpu.md").read_text()
    assert "faiss CPU" in md and "MMT" not in md and "training" not in md
    with pytest.raises(SystemExit):
        gpu.main(["--tiny", "--sections", "kmean", "--out", str(tmp_path), "--data", market])


def test_gpu_bench_step_profile(tmp_path, market):
    """The step alone at two batch sizes, and the fixed per-step cost fitted from them."""
    from bench import gpu

    rec = gpu.main(["--tiny", "--sections", "profile", "--out", str(tmp_path), "--data", market])
    pr = rec["profile"]
    assert sorted(pr["batches"]) == [16, 64] and all(b["step_only_img_s"] > 0 for b in pr["batches"].values())
    t16, t64 = pr["batches"][16]["step_ms"], pr["batches"][64]["step_ms"]
    assert abs(pr["fixed_ms"] - (t16 - (t64 - t16) / 48 * 16)) < 1e-9
    assert "the step's fixed cost" in (tmp_path / "gpu.md").read_text()
