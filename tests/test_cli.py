import subprocess
import sys

from reid_ray.cli import main


def test_datasets_command_prints_stats(tiny_synth, capsys):
    assert main(["datasets", "synth-a", "--data-root", str(tiny_synth)]) == 0
    assert "train" in capsys.readouterr().out


def test_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["datasets", "market1501", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reid-ray: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_synth_command_via_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "reid_ray", "synth", str(tmp_path), "--train-ids", "4",
                          "--test-ids", "3", "--no-camstyle"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "synth-a" / "query").is_dir() and not list((tmp_path / "synth-a" / "camstyle").iterdir())


def test_summary_calls_source_only_methods_direct_transfer(capsys):
    from reid_ray.cli.train import print_summary
    from reid_ray.config import resolve_config

    out = {"metrics": {"source_mAP": 90.0, "source_R1": 95.0, "target_mAP": 20.0, "target_R1": 30.0},
           "wall_time": 1.0, "mlflow_run_id": "r", "mlflow_uri": "u", "checkpoint": "c", "run_dir": "d"}
    labels = {}
    for method in ("baseline", "san", "mmt"):
        print_summary(resolve_config(method), out)
        labels[method] = capsys.readouterr().out
    assert "(direct transfer)" in labels["baseline"] and "(direct transfer)" in labels["san"]
    assert "(adapted)" in labels["mmt"] and "(direct transfer)" not in labels["mmt"]
