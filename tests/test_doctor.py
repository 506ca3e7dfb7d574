"""`reid-ray doctor` on a tiny synthetic data root, without Ray."""

import pytest

from reid_ray.cli.doctor import main
from reid_ray.data.readers import read_dataset


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    # a wide console keeps each table row on one line, so the assertions can read rows
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.strip("│ ").startswith(name + " "))


def test_lists_datasets_with_counts_and_missing_ones(tiny_synth, capsys):
    assert main(["--no-ray", "--data-root", str(tiny_synth)]) == 0
    out = capsys.readouterr().out
    for name in ("synth-a", "synth-b"):
        st = read_dataset(name, tiny_synth).stats()
        line = row(out, name)
        for split in ("train", "query", "gallery"):
            assert f"{st[split]['ids']} / {st[split]['images']}" in line, (split, line)
        assert "ok" in line
    market = row(out, "market1501")
    assert "not found" in market and "Market-1501-v15.09.15/" in market
    assert "not found" in row(out, "msmt17")
    for part in ("torch", "faiss", "mlflow", "skipped (--no-ray)"):
        assert part in out


def test_broken_dataset_is_a_problem_and_strict_fails(tmp_path, capsys):
    (tmp_path / "Market-1501-v15.09.15").mkdir()  # the top folder without its splits
    assert main(["--no-ray", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "broken" in row(out, "market1501") and "problem(s)" in out
    assert main(["--no-ray", "--strict", "--data-root", str(tmp_path)]) == 1


def test_local_mlflow_store_on_a_cluster_is_flagged(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert main(["--no-ray", "--data-root", str(tmp_path), "--mlflow-uri", "sqlite:///mlflow.db"]) == 0
    assert "shared MLflow server" in capsys.readouterr().out


def test_cuda_stack_mismatches_are_problems_with_fixes():
    from reid_ray.cli.doctor import cuda_major, cuda_stack_problems

    assert cuda_major("13.0") == 13 and cuda_major("faiss-gpu-cu12") == 12 and cuda_major("faiss-gpu") is None
    ok = cuda_stack_problems("13.0", 1, "580.65.06", ["faiss-gpu-cu13-cuvs"], 1)
    assert ok == []
    assert cuda_stack_problems(None, 0, None, ["faiss-cpu"], 0) == []  # a CPU machine: nothing to fix
    both = cuda_stack_problems("13.0", 1, "580.1", ["faiss-cpu", "faiss-gpu-cu13-cuvs"], 1)
    assert len(both) == 1 and "two faiss builds" in both[0][0] and "uninstall" in both[0][1]
    cu12 = cuda_stack_problems("13.0", 1, "580.1", ["faiss-gpu-cu12"], 1)
    assert "CUDA 12, torch for CUDA 13" in cu12[0][0] and ".[gpu]" in cu12[0][1]
    # faiss-cpu beside CUDA torch: clustering runs in torch on the GPU (clustering.backend=auto), nothing to fix
    assert cuda_stack_problems("13.0", 2, "580.1", ["faiss-cpu"], 0) == []
    old_driver = cuda_stack_problems("13.0", 1, "550.54.15", ["faiss-gpu-cu13-cuvs"], 1)
    assert ">= 580" in old_driver[0][0] and "driver" in old_driver[0][1]
    # where a driver is found: an old one hides the GPUs from torch (one problem, the driver's)
    hidden = cuda_stack_problems("13.0", 0, "550.54.15", ["faiss-gpu-cu13-cuvs"], 0)
    assert len(hidden) == 1 and ">= 580" in hidden[0][0]
    cpu_torch = cuda_stack_problems(None, 0, "580.65.06", ["faiss-gpu-cu13-cuvs"], 1)
    assert len(cpu_torch) == 1 and "CPU-only build" in cpu_torch[0][0] and "torch==2.14.1" in cpu_torch[0][1]
    unseen = cuda_stack_problems("13.0", 0, "580.65.06", ["faiss-gpu-cu13-cuvs"], 0)
    assert len(unseen) == 1 and "sees no GPU" in unseen[0][0] and "CUDA_VISIBLE_DEVICES" in unseen[0][1]


def test_doctor_reports_the_cuda_stack_on_a_cpu_machine(tmp_path, capsys):
    assert main(["--no-ray", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for item in ("NVIDIA driver", "torch CUDA build", "CUDA runtime (pip)"):
        assert item in out, item
    assert "faiss-cpu" in row(out, "faiss")
