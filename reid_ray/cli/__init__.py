"""The `reid-ray` console script.

    reid-ray synth data/                      # write the synthetic benchmark (synth-a, synth-b)
    reid-ray datasets market1501 --data-root /datasets   # check a dataset and print its stats
    reid-ray train ...                        # = python -m reid_ray.train ...
    reid-ray tune ...                         # = python -m reid_ray.tune ...
    reid-ray report --experiment "synth-a->synth-b"   # Markdown + PNG comparison of an MLflow experiment
    reid-ray doctor [--data-root DIR] [--no-ray]      # what a run would use here: Ray, GPUs, faiss, datasets, MLflow
    reid-ray san-pg pairs|train|predict ...   # SAN's pseudo texture generator (= python -m reid_ray.cli.san_pg)
    reid-ray evaluate --checkpoint C --dataset market1501 --data-root /datasets [--rerank]   # mAP/CMC
    reid-ray export --checkpoint C --onnx embedder.onnx       # the retrieval embedder as ONNX
    reid-ray embed --checkpoint C --images DIR --out feats.parquet   # features of a folder of images
    reid-ray demo [tune flags]                # make demo: write the benchmark, pretrain, sweep MMT (2 trials)
    reid-ray --version

A mistake a user can fix prints one line naming the problem and the fix, and
exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from reid_ray import ReidRayError


def run_cli(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command, turning user errors into one clear line and exit code 2, and Ctrl-C (SIGINT) or SIGTERM
    into exit code 130 or 143 (the command itself has stopped its Ray work and said how to resume)."""
    from reid_ray import catch_stop_signals, stopped_by

    catch_stop_signals()
    try:
        return fn(args) or 0
    except ReidRayError as e:
        print(f"reid-ray: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever it quotes
        return 2
    except KeyboardInterrupt as e:
        stopped = stopped_by(e)
        if not getattr(e, "reported", False):
            print(f"reid-ray: stopped ({stopped.name})", file=sys.stderr)
        return stopped.exit_code


def _synth(args: argparse.Namespace) -> int:
    from reid_ray.data.synthetic import SynthConfig, generate_market_shaped, generate_synthetic

    if args.preset == "market":
        print(f"wrote {generate_market_shaped(args.out_dir, args.seed, overwrite=args.overwrite, progress=True)} "
              f"(read it as --source market1501 --data-root {args.out_dir})")
        return 0

    cfg = SynthConfig(seed=args.seed, train_ids=args.train_ids, test_ids=args.test_ids,
                      camstyle=not args.no_camstyle, texture=not args.no_texture)
    for top in generate_synthetic(args.out_dir, cfg, overwrite=args.overwrite, progress=True):
        print(f"wrote {top}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from reid_ray.data.readers import read_dataset

    print(read_dataset(args.name, args.data_root, variant=args.variant))
    return 0


# subcommands with parsers of their own (module, its main function): argv after the name goes to them
FORWARDED = {
    "train": ("reid_ray.cli.train", "main", "train one method under Ray Train (= python -m reid_ray.train)"),
    "tune": ("reid_ray.cli.tune", "main", "sweep a method's hyperparameters with Ray Tune + Optuna (= python -m reid_ray.tune)"),
    "report": ("reid_ray.cli.report", "main", "Markdown table + PNG plots comparing the runs of an MLflow experiment"),
    "evaluate": ("reid_ray.cli.export", "main_evaluate", "mAP/CMC of any checkpoint on any dataset, optionally re-ranked"),
    "export": ("reid_ray.cli.export", "main_export", "write a checkpoint's retrieval embedder as ONNX"),
    "embed": ("reid_ray.cli.export", "main_embed", "embed a folder of images into a Parquet file of features"),
    "doctor": ("reid_ray.cli.doctor", "main", "what a run would use here: Ray, GPUs, CUDA, faiss, datasets, MLflow"),
    "demo": ("reid_ray.cli.demo", "main", "the demo: the benchmark, a source model, a 3-trial MMT sweep (= make demo)"),
    "san-pg": ("reid_ray.cli.san_pg", "main", "SAN's pseudo texture generator: pairs, train, predict"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("reid-ray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid-ray", description="Train, tune and compare unsupervised domain "
                                     "adaptation person re-ID methods on Ray.",
                                     epilog="`reid-ray COMMAND --help` shows a command's own flags.")
    parser.add_argument("--version", action="version", version=f"reid-ray {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the embedded synthetic two-domain benchmark")
    p.add_argument("out_dir", help="folder to write synth-a/ and synth-b/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=("embedded", "market"), default="embedded",
                   help="embedded: the two-domain benchmark (synth-a, synth-b); market: one Market-1501-shaped "
                        "set of 256x128 JPEGs (751 ids / 12,936 training images, 3,368 queries, 15,913 gallery) "
                        "in Market's layout, for timing the data pipeline")
    p.add_argument("--train-ids", type=int, default=150)
    p.add_argument("--test-ids", type=int, default=100)
    p.add_argument("--no-camstyle", action="store_true", help="skip the CamStyle images (for ECN)")
    p.add_argument("--no-texture", action="store_true", help="skip the texture maps (for SAN)")
    p.add_argument("--overwrite", action="store_true", help="replace a benchmark made with another config")
    p.set_defaults(fn=_synth)

    p = sub.add_parser("datasets", help="read a dataset in its published layout and print its stats")
    p.add_argument("name", help="market1501, dukemtmc, msmt17, cuhk03np, synth-a, synth-b, or folder:PATH")
    p.add_argument("--data-root", default=None, help="folder that holds the dataset's own top folder (not for "
                                                     "folder:PATH)")
    p.add_argument("--variant", default=None, help="cuhk03np: labeled (default) or detected")
    p.set_defaults(fn=_datasets)
    for name, (_module, _fn, help_line) in FORWARDED.items():  # listed here, parsed by their own modules (main)
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `reid-ray train|tune|report|doctor ...` forward to the module entry points with their own parsers
    if argv and argv[0] in FORWARDED:
        import importlib

        module, fn, _help = FORWARDED[argv[0]]
        return getattr(importlib.import_module(module), fn)(argv[1:])
    args = build_parser().parse_args(argv)
    return run_cli(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
