"""What a person sees: `reid-ray --help` and `--version`, `--resume` in train and tune, tables that fit the
terminal, and a training run and a sweep whose consoles show each epoch once, with no warnings, no error-level
lines and none of Ray's own output (two subprocesses, as a user runs them)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from reid_ray import ReidRayError

# what a successful run must never print (Ray's error-level C++ lines look like "[... E 123 456] file.cc:...")
NOISE = re.compile(r"warning|findfont|traceback|\berror\b| E \d+ \d+\]|\(RayTrainWorker|\(TrainController|tensorboard|"
                   r"Trial status|Started a local Ray", re.IGNORECASE)


def test_help_lists_every_command_and_version_works(capsys):
    from reid_ray.cli import FORWARDED, main, version

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for name in ("synth", "datasets", *FORWARDED):
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", out, re.MULTILINE), f"{name} missing from --help:\n{out}"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"reid-ray {version()}" and version() != "unknown"


def test_train_resume_takes_a_run_name_a_run_folder_a_checkpoint_or_nothing(tmp_path):
    from reid_ray.cli.train import resolve_resume

    out = tmp_path / "outputs"
    for run, stamps in (("baseline-1", ("2026-12-01_10-00-00", "2026-12-01_10-05-00")), ("baseline-2", ("2026-12-01_11",))):
        for stamp in stamps:
            (out / run / f"checkpoint_{stamp}").mkdir(parents=True)
            torch.save({"method": {}, "epoch": 0}, out / run / f"checkpoint_{stamp}" / "checkpoint.pt")
    os.utime(out / "baseline-1" / "checkpoint_2026-12-01_10-05-00" / "checkpoint.pt", (1, 1))  # baseline-2 is newer
    newest_of_1 = str(out / "baseline-1" / "checkpoint_2026-12-01_10-05-00")
    assert resolve_resume("baseline-1", str(out), "baseline") == newest_of_1                 # a run name
    assert resolve_resume(str(out / "baseline-1"), str(out), "baseline") == newest_of_1     # its folder
    ckpt = str(out / "baseline-1" / "checkpoint_2026-12-01_10-00-00")
    assert resolve_resume(ckpt, str(out), "baseline") == ckpt                                # a checkpoint, as before
    assert resolve_resume(True, str(out), "baseline") == str(out / "baseline-2" / "checkpoint_2026-12-01_11")
    with pytest.raises(ReidRayError, match="no earlier mmt run with a checkpoint"):
        resolve_resume(True, str(out), "mmt")
    (out / "empty-run").mkdir()
    with pytest.raises(ReidRayError, match="no checkpoint that loads in"):
        resolve_resume("empty-run", str(out), "baseline")


def test_tune_resume_takes_a_sweep_name_or_folder(tmp_path):
    from reid_ray.cli.tune import build_parser, prepare_sweep

    out = tmp_path / "outputs"
    for value, message in (("nosuch", "no sweep named 'nosuch'"), (str(out / "tune" / "nosuch"), "no sweep in that")):
        args = build_parser().parse_args(["--resume", value, "--output", str(out)])
        with pytest.raises(ReidRayError, match=message):
            prepare_sweep(args)
    args = build_parser().parse_args(["--resume", "a", "--name", "b"])
    with pytest.raises(ReidRayError, match="name two sweeps"):
        prepare_sweep(args)
    assert build_parser().parse_args(["--name", "a", "--resume"]).resume is True  # the old spelling


def test_the_final_table_fits_the_terminal_and_names_what_it_left_out():
    from rich.console import Console

    from reid_ray.tracking.report import fitted_table, short_names

    params = ["params.num_clusters", "params.alpha", "optim.lr", "model.lr"]
    names = short_names(params)
    assert names == {"params.num_clusters": "num_clusters", "params.alpha": "alpha", "optim.lr": "optim.lr",
                     "model.lr": "model.lr"}
    key = [["a1b2c3d4", "44.8", "58.1", "8", "completed"], ["e5f6a7b8", "40.5", "52.0", "4", "stopped by ASHA"]]
    extra = [["109", "0.985", "0.000265", "1"], ["118", "0.9714", "0.000242", "2"]]
    for width in (60, 80, 200):
        table = fitted_table("sweep s: mmt, synth-a -> synth-b", ["trial", "target mAP", "R1", "epochs", "status"], key,
                             [names[p] for p in params], extra, width, note="outputs/tune/s/summary.md")
        console = Console(width=width, record=True)
        console.print(table)
        text = console.export_text()
        assert "…" not in text and "stopped by ASHA" in text and "44.8" in text, text
        assert max(len(line) for line in text.splitlines()) <= width
        shown = [p for p in params if names[p] in text]
        assert len(shown) == len(params) or f"{len(params) - len(shown)} more column" in text, text
    assert len(shown) == len(params)  # all of them at 200 columns


def test_epoch_lines_carry_the_loss_target_map_and_time():
    from reid_ray.tracking.console import epoch_line, status_text

    m = {"epoch": 3, "loss": 5.8177, "target_mAP": 45.123, "target_R1": 60.0, "epoch_time": 7.06}
    assert epoch_line("mmt-1", m, 8) == "mmt-1  epoch 3/8  loss 5.818  target mAP 45.1  R1 60.0  (7.1 s)"
    assert status_text({"loss": float("nan")}) == ""


@pytest.mark.ray
def test_a_training_run_shows_each_epoch_once_and_nothing_else_of_ray(cli_training):
    text = cli_training.text
    assert cli_training.proc.returncode == 0, text
    assert [line.count("quiet  epoch 1/4") for line in text.splitlines() if "epoch 1/4" in line] == [1], text
    assert all(sum(f"epoch {e}/4" in line for line in text.splitlines()) == 1 for e in (2, 3, 4)), text
    assert not NOISE.findall(text), NOISE.findall(text)
    assert "…" not in text  # the summary table fits 80 columns


@pytest.mark.ray
def test_a_sweep_shows_its_trials_and_nothing_else_of_ray_or_tune(cli_sweep):
    text = cli_sweep.text
    assert cli_sweep.proc.returncode == 0, text
    assert not NOISE.findall(text), NOISE.findall(text)
    ended = [line for line in text.splitlines() if re.match(r"trial \w+: (completed|stopped by ASHA) after \d epochs",
                                                            line)]
    assert len(ended) == 2, text
    assert "best config:" in text and "…" not in text

    import optuna

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{cli_sweep.root / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2


def test_the_bar_keeps_its_times_on_a_narrow_terminal_and_is_not_drawn_into_a_log():
    import io

    from rich.console import Console

    from reid_ray.tracking.console import make_progress

    buf = io.StringIO()
    progress = make_progress(Console(file=buf, force_terminal=True, width=80, color_system=None))
    task = progress.add_task("pretrain-11a7155b2567", total=2, status="loss 4.722  target mAP 13.1")
    progress.update(task, completed=1)
    progress.console.print(progress.get_renderable())
    line = buf.getvalue().rstrip("\n")
    assert len(line) <= 80 and re.search(r"1/2 .* \d:\d\d:\d\d eta ", line) and "…" not in line, line
    assert make_progress(Console(file=io.StringIO())).disable  # a log gets the epoch lines only
