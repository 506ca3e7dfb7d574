"""`reid-ray doctor` on a tiny synthetic data root, without Ray."""

import pytest

from reid_ray.data.readers import read_dataset
from reid_ray.doctor import main


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
