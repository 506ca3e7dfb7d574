"""Train one method under Ray Train (DDP over N workers, checkpoints, resume) with MLflow tracking.

    python -m reid_ray.train                                   # BoT baseline, synth-a -> synth-b, 2 CPU workers
    python -m reid_ray.train --method baseline --source market1501 --target dukemtmc \\
        --data-root /datasets --workers 4 --set model.arch=resnet50 --set model.pretrained=/w/r50.pth
    reid-ray train ...                                         # the same

On the embedded default it writes the synthetic benchmark if missing, starts a
local Ray (or joins the cluster in RAY_ADDRESS), trains, and prints source
(supervised) and target (direct transfer) mAP/R1, the wall time, and where the
MLflow run and checkpoint are. The CLI only resolves the config (config.resolve_config)
and hands it to the Ray layer (distributed/driver.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reid_ray import ReidRayError, storage
from reid_ray.config import TrainConfig, checks, dotted, flatten, load_config_file, resolve_config
from reid_ray.config.schema import METRICS
from reid_ray.methods import METHODS, method_class
from reid_ray.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, newest_readable_checkpoint, run_checkpoints


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The run's config from the parsed flags: every layer of config.resolve_config. With `--resume`, the
    resumed run's own config (kept in its checkpoint) is the layer under the user's file, flags and --set:
    the run continues with its name, folder, settings and MLflow run, and each setting a flag changes is
    named on one line."""
    method, source, target, file = (None, None, None, {})
    if a.config:
        method, source, target, file = load_config_file(a.config)
    resume = resolve_resume(a.resume, a.output or file.get("output") or "outputs", a.method or method)
    flags = dict(data_root=a.data_root, workers=a.workers, epochs=a.epochs, eval_every=a.eval_every, seed=a.seed,
                 mlflow_uri=a.mlflow_uri, experiment=a.experiment, name=a.name, output=a.output,
                 resume=resume, init=a.init, clustering=a.clustering, metric=a.metric)
    saved = _saved_config(resume)
    if saved is None:
        cfg = resolve_config(a.method or method or "baseline", a.source or source, a.target or target,
                             preset=a.preset, file=file, flags=flags, sets=a.overrides)
    else:
        cfg = _resumed_config(saved, resume, a.method or method, a.source or source, a.target or target, a.preset,
                              file, flags, a.overrides)
    cfg.name = cfg.name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"  # named here: the resume line says it
    check_config(cfg)
    return cfg


def _saved_config(resume: str | None) -> dict | None:
    """The config a `--resume` checkpoint was trained with (dotted keys), or None (no --resume, or a checkpoint
    that does not say: check_config then names what is wrong with it)."""
    if not resume or not storage.exists(resume):
        return None
    path = storage.join(resume, CHECKPOINT_FILE) if storage.is_dir(resume) else resume
    try:
        state = load_checkpoint(storage.fetch(path) if storage.is_uri(path) else path, mmap=True)
    except ReidRayError:
        return None
    saved = state.get("config")
    return dotted(saved) if isinstance(saved, dict) and saved.get("method") else None


def _resumed_config(saved: dict, resume: str, method, source, target, preset, file: dict, flags: dict,
                    sets: list[str]) -> TrainConfig:
    saved = dict(saved)
    run_method, run_source, run_target = (saved.pop(k, None) for k in ("method", "source", "target"))
    if method and method != run_method:
        raise ReidRayError(f"--resume {resume}: a checkpoint of method {run_method!r}, not {method!r}; pass "
                           f"--method {run_method} (or leave --method out)")
    saved.pop("resume", None)
    run = resolve_config(run_method, run_source, run_target, file=saved)
    cfg = resolve_config(run_method, source or run_source, target or run_target, preset=preset,
                         file={**saved, **file}, flags=flags, sets=sets)
    before, after = flatten(run), flatten(cfg)
    for key in sorted(after):
        if key != "resume" and before.get(key) != after[key]:
            print(f"--resume: {key} {_shown(before.get(key))} → {_shown(after[key])}", flush=True)
    return cfg


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resolve_resume(value: str | bool | None, output: str, method: str | None) -> str | None:
    """`--resume` as a checkpoint: a checkpoint file or directory (as before), a run's folder or its run name
    under --output (its newest checkpoint that loads), or no value: the newest run under --output (of --method
    when given). A local folder or a URI alike (reid_ray.storage)."""
    if value is None or value == "":
        return value
    if value is True:  # bare --resume: the run whose newest checkpoint was written last
        newest = {run: found[-1] for run, is_file, _ in storage.listing(output)
                  if not is_file and run.startswith(f"{method}-" if method else "") and run not in ("pretrain", "tune")
                  and (found := run_checkpoints(storage.join(output, run)))}
        if not newest:
            raise ReidRayError(f"--resume: no earlier {method or ''} run with a checkpoint under {output}; pass its "
                               "run name or a checkpoint path")
        run, _ = max(newest.items(), key=lambda kv: (kv[1][1], kv[1][0]))
        return _newest_readable(storage.join(output, run), value)
    path = value if storage.is_uri(value) else Path(value).expanduser()
    if not storage.exists(path) and "/" not in value and storage.is_dir(storage.join(output, value)):
        path = storage.join(output, value)  # a run name
    if storage.is_dir(path) and not storage.is_file(storage.join(path, CHECKPOINT_FILE)):
        return _newest_readable(path, value)
    return str(path) if storage.exists(path) else value  # a missing one: check_config names it


def _newest_readable(run_dir, value) -> str:
    """A run folder's newest checkpoint that loads; one cut short (a crash, a full disk) is named and passed over."""
    found, unreadable = newest_readable_checkpoint(run_dir)
    shown = "" if value is True else f" {value}"
    if found is None:
        what = f" (unreadable: {', '.join(unreadable)})" if unreadable else ""
        raise ReidRayError(f"--resume{shown}: no checkpoint that loads in {run_dir}{what} (a run folder holds "
                           f"checkpoint_*/{CHECKPOINT_FILE}); pass a checkpoint path")
    for name in unreadable:
        print(f"--resume: {storage.join(run_dir, name)} does not load (cut short?); using {found}", flush=True)
    return found


def check_config(cfg: TrainConfig) -> None:
    """What can be checked before Ray starts (the data's part: checks.check_run, in the driver)."""
    checks.check_config(cfg)
    if cfg.resume:
        path = Path(cfg.resume)
        if storage.is_uri(cfg.resume):  # read from this node's copy (cached: a worker here reuses it)
            path = storage.join(cfg.resume, CHECKPOINT_FILE) if storage.is_dir(cfg.resume) else cfg.resume
            if not storage.is_file(path):
                raise ReidRayError(f"--resume {cfg.resume}: no such checkpoint directory or file")
            path = storage.fetch(path)
        elif not path.exists():
            raise ReidRayError(f"--resume {cfg.resume}: no such checkpoint directory or file")
        state = load_checkpoint(path / CHECKPOINT_FILE if path.is_dir() else path, mmap=True)
        if state.get("config", {}).get("method") not in (None, cfg.method):
            raise ReidRayError(f"--resume {cfg.resume}: a checkpoint of method {state['config']['method']!r}, "
                               f"not {cfg.method!r}; pass --method {state['config']['method']}")
        _same_network(state, cfg, f"--resume {cfg.resume}")
    for init in cfg.init:
        if storage.is_file(init):  # a missing one is named by the driver (driver.source_inits); a URI: fetched
            _same_network(load_checkpoint(storage.fetch(init), "--init", mmap=True), cfg, f"--init {init}")


def _same_network(state: dict, cfg: TrainConfig, what: str) -> None:
    """A checkpoint of another backbone cannot be loaded into this run's network."""
    theirs, ours = state.get("config", {}).get("model", {}).get("arch"), cfg.model.arch
    if theirs is not None and theirs != ours:
        raise ReidRayError(f"{what}: a checkpoint of a {theirs} network, this run builds {ours}; "
                           f"pass --set model.arch={theirs} or another checkpoint")


def resume_line(cfg: TrainConfig, e: BaseException) -> str:
    """What an interrupted run prints last: the command that continues it (its settings are in its checkpoint)."""
    from reid_ray import stopped_by

    why = stopped_by(e).name
    output = "" if cfg.output == "outputs" else f" --output {cfg.output}"
    if not run_checkpoints(storage.join(storage.absolute(cfg.output), cfg.name)):
        return f"reid-ray: stopped ({why}) before run {cfg.name} wrote its first checkpoint; rerun the same command"
    return f"reid-ray: stopped ({why}); resume with: python -m reid_ray.train --resume {cfg.name}{output}"


def print_summary(cfg: TrainConfig, out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = out["metrics"]
    table = Table(title=f"{cfg.method}: {cfg.source} -> {cfg.target_label}")
    table.add_column("")
    table.add_column("mAP (%)", justify="right")
    table.add_column("R1 (%)", justify="right")
    adapted = ("adapted" if method_class(cfg.method).adapts else "direct transfer") if cfg.has_source else "unsupervised"
    rows = [("source", f"source {cfg.source} (supervised)")] if cfg.has_source else []
    if cfg.target_labelled:  # a folder of unlabelled images has no target mAP: no row pretends it has one
        rows.append(("target", f"target {cfg.target} ({adapted})"))
    for name, label in rows:
        table.add_row(label, f"{m.get(f'{name}_mAP', float('nan')):.1f}", f"{m.get(f'{name}_R1', float('nan')):.1f}")
    ranked = cfg.selection_metric
    for key, label in (("source_val_mAP", "source-validation mAP (label-free)"),
                       ("target_probe", "target mixup probe (label-free, %)"),
                       ("target_sharpness", "target sharpness (label-free, %)")):
        if key in m:
            table.add_row(label + (" (ranked on)" if key == ranked else ""), f"{m[key]:.1f}", "")
    console = Console(highlight=False)
    console.print(table)
    if not cfg.target_labelled:
        console.print(f"{cfg.target_label} has no labels: best.pt is the epoch with the best {ranked}")
    from reid_ray.tracking import ui_hint

    uri = out["mlflow_uri"]
    tracked = (f"MLflow run {out['mlflow_run_id']} in {uri}\n{ui_hint(uri, cfg.experiment_name)}"
               if out["mlflow_run_id"] else f"MLflow run: {uri} did not answer at the end")
    console.print(f"wall time {out['wall_time']:.0f} s\n{tracked}\ncheckpoint {out['checkpoint']}\n"
                  f"best checkpoint and CMC plot in {out['run_dir']}", soft_wrap=True)
    if out.get("mlflow_fallback"):
        where = out["mlflow_fallback"]
        if storage.is_uri(where) and not where.startswith("sqlite:"):  # an object store's copy, not a local store
            where += " (an SQLite store: download it, then mlflow ui --backend-store-uri sqlite:///<the copy>)"
        console.print(f"[yellow]the tracking server was unreachable at the end: the rest of the run's metrics are in "
                      f"{where}[/yellow]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid-ray train", description=__doc__.split("\n")[0])
    p.add_argument("--method", default=None, help=f"one of: {', '.join(sorted(METHODS))} (default baseline)")
    p.add_argument("--source", default=None, help="labelled source dataset (default synth-a), or none: the fully "
                   "unsupervised setting (the target alone; spcl, cluster_contrast)")
    p.add_argument("--target", default=None, help="unlabelled target dataset (default synth-b), or folder:PATH: your "
                                                  "own unlabelled images (searched recursively)")
    p.add_argument("--metric", default=None, choices=("auto", *METRICS),
                   help="what best.pt ranks epochs on: target_mAP (needs target labels; the default where the target "
                        "has them), target_sharpness (the default for a target with no labels), target_probe or "
                        "source_val_mAP")
    p.add_argument("--config", default=None, help="a config YAML, e.g. a sweep's best_config.yaml (flags override it)")
    p.add_argument("--preset", default=None, help="a real-benchmark preset, e.g. duke2market (reid_ray/config/presets.py)")
    p.add_argument("--data-root", default=None, help="folder holding the datasets' own top folders (default: data)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: <source>-><target>)")
    p.add_argument("--name", default=None, help="run name (default: <method>-<time>)")
    p.add_argument("--output", default=None, help="checkpoints and run files (default: outputs)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                   help="continue from a checkpoint: a run name or folder under --output (its newest checkpoint), "
                        "a checkpoint directory or checkpoint.pt; alone: the newest run (of --method, when "
                        "given). The run's own settings, name and MLflow run come back; a flag beside it "
                        "changes that setting (each change is named)")
    p.add_argument("--verbose", action="store_true", help="also print Ray's and Ray Train's own console output")
    p.add_argument("--init", nargs="+", default=None, metavar="CHECKPOINT",
                   help="UDA methods: the source-trained baseline checkpoint.pt to start from, one per source "
                        "model the method starts from (default: trained on the source first, cached, with seeds "
                        "seed, seed + 1, ...)")
    p.add_argument("--clustering", choices=("actor", "local"), default=None,
                   help="pseudo-labels from the PseudoLabeler Ray actor (default) or in-process on rank 0 "
                        "(clustering.where; the engine is --set clustering.backend=auto|faiss|torch)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set model.arch=resnet18 --set lr=1e-4")
    return p


def main(argv=None) -> int:
    from reid_ray.cli import run_cli

    args = build_parser().parse_args(argv)
    from reid_ray.tracking import console

    console.set_verbose(args.verbose)

    def _run(a):
        cfg = config_from_args(a)
        from reid_ray.distributed.driver import run_training

        try:
            out = run_training(cfg)
        except KeyboardInterrupt as e:
            print(resume_line(cfg, e), file=sys.stderr, flush=True)
            e.reported = True
            raise
        print_summary(cfg, out)
        return 0

    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
