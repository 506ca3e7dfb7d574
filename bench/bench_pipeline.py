"""The data pipeline against the training step: which of the two bounds an epoch.

    python -m bench.bench_pipeline [--data embedded|jpeg] [--batches N] [--repeats 3] [--data-root data] [--set K=V]

Both on the BoT baseline's own train loader and training step (`reid_ray.training.loop.train_epoch`), one
process, all the machine's cores for torch:
  embedded  the synthetic benchmark's synth-a (64x32 images kept in memory, the `small` backbone);
  jpeg      Market-shaped 256x128 JPEGs (`reid-ray synth DIR --preset market`, a 40-identity subset written
            under bench/out/pipeline when absent) decoded from disk each time, ResNet-50.
Times the loader alone (decode + augment + collate, images/s) and the step alone (forward, backward and
the optimiser on batches already loaded), each the median of --repeats runs after a warm-up, and prints one
JSON line: the slower of the two is the epoch's bound. `make bench`'s pipeline section (`section_pipeline`:
`python -m bench.run --only pipeline`) tabulates both data kinds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

from bench import harness

JPEG_ROOT = Path("bench/out/pipeline")
JPEG_IDS = 40


def setup(data: str, data_root: str = "data", sets: tuple[str, ...] = ()):
    import torch

    from reid_ray.config import resolve_config
    from reid_ray.data.domains import ensure_data
    from reid_ray.methods import METHODS

    if data == "embedded":
        cfg = resolve_config("baseline", flags=dict(data_root=data_root, workers=1), sets=list(sets))
    else:
        from reid_ray.data.synthetic import MARKET_TOP, generate_market_shaped

        if not (JPEG_ROOT / MARKET_TOP).is_dir():
            generate_market_shaped(JPEG_ROOT, ids=JPEG_IDS)
        cfg = resolve_config("baseline", "market1501", "market1501", flags=dict(data_root=str(JPEG_ROOT), workers=1),
                             sets=["model.arch=resnet50", "transform.height=256", "transform.width=128",
                                   "model.sync_bn=false", *sets])
    torch.set_num_threads(os.cpu_count() or 1)
    method = METHODS["baseline"](cfg, ensure_data(cfg), torch.device("cpu"))
    method.setup()
    return cfg, method


class Loaded(list):
    """Batches already loaded, in the shape `train_epoch` takes a loader in (the epoch it sets is moot)."""
    sampler = SimpleNamespace(epoch=0, set_epoch=lambda epoch: None)


def measure(data: str, batches: int, repeats: int, data_root: str = "data", sets: tuple[str, ...] = ()) -> dict:
    from reid_ray.data.loader import epoch_batches
    from reid_ray.methods import EpochContext
    from reid_ray.training.loop import train_epoch

    cfg, method = setup(data, data_root, sets)
    loader, epoch = method.train_loader, itertools.count()
    batch_size = loader.batch_size

    def load() -> list:
        loader.sampler.set_epoch(next(epoch))
        return list(epoch_batches(loader, batches))

    load_times = harness.timed(load, repeats).times  # after a warm-up: worker start, first-call costs
    method.train_loader = Loaded(load())  # one pass over batches already in memory: the step alone
    method.iterations = lambda: None
    ctx = EpochContext(0)
    train_epoch(method, ctx)  # warm-up
    step_times = [train_epoch(method, ctx)["epoch_time"] for _ in range(repeats)]  # the steps' own time
    n = batches * batch_size
    res = {"data": data, "arch": cfg.model.arch, "hw": [cfg.transform.height, cfg.transform.width],
           "batch": batch_size, "batches": batches, "loader_processes": loader.num_workers,
           "loader_times": load_times, "step_times": step_times,
           "loader_img_s": n / statistics.median(load_times), "step_img_s": n / statistics.median(step_times)}
    res["bound"] = "loader" if res["loader_img_s"] < res["step_img_s"] else "step"
    return res


def _rate(res: dict, key: str, times: str) -> str:
    """'images/s (min-max over runs)' with LOADED as in harness.fig."""
    n = res["batches"] * res["batch"]
    xs = res[times]
    return f"{res[key]:,.0f} img/s ({n / max(xs):,.0f}-{n / min(xs):,.0f}, {len(xs)} runs){harness.loaded(res)}"


def _table_row(r: dict) -> str:
    fast, slow = sorted((r["loader_img_s"], r["step_img_s"]), reverse=True)
    return (f"| {r['data']} ({r['hw'][0]}×{r['hw'][1]}) | {r['arch']} | {r['loader_processes']} | "
            f"{_rate(r, 'loader_img_s', 'loader_times')} | {_rate(r, 'step_img_s', 'step_times')} | "
            f"**{r['bound']}** ({fast / slow:.1f}× slower) |")


def section_pipeline(repeats: int, out: Path, quick: bool = False, data_root: str = "data",
                     sets: tuple[str, ...] = ()) -> list[str]:
    lines = ["### The data pipeline: the loader alone against the training step alone", "",
             "The BoT baseline's own train loader (P×K 16×4, flip, pad + crop, normalise, random erasing, collate) "
             "and its step (label-smoothed CE + batch-hard triplet, Adam) through `training.loop.train_epoch` on batches "
             "already loaded; one process, every core for torch. *embedded*: synth-a in memory, 64×32, the `small` "
             "backbone; *JPEG*: Market-shaped 256×128 JPEGs decoded from disk each time (a 40-identity subset), "
             "ResNet-50. The slower of the two bounds the epoch.", "",
             "| data | model | loader processes | loader alone | step alone | bound |", "|---|---|---|---|---|---|"]
    for data in ("embedded",) if quick else ("embedded", "jpeg"):
        args = ["--data", data, "--repeats", str(repeats), "--data-root", data_root, *(f"--set={x}" for x in sets)]
        args += ["--batches", "2"] if quick else []
        harness.script_row(lines, "bench.bench_pipeline", args, data, 6, _table_row)
    return [*lines, ""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("embedded", "jpeg"), default="embedded")
    ap.add_argument("--batches", type=int, default=None, help="batches a run (default: 20 embedded, 2 jpeg)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", default="data", help="the embedded benchmark's folder (written there when absent)")
    ap.add_argument("--set", action="append", default=[], help="a config override, as in reid-ray train")
    args = ap.parse_args(argv)
    batches = args.batches or (20 if args.data == "embedded" else 2)
    print(json.dumps(measure(args.data, batches, args.repeats, args.data_root, tuple(args.set))))


if __name__ == "__main__":
    main()
