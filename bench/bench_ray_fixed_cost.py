"""The fixed cost of one Ray Train run, broken down: an empty training function under `TorchTrainer.fit()`.

    python -m bench.bench_ray_fixed_cost [--workers 2] [--repeats 3]

Ray is started as the CLI starts it (reid_ray.distributed.runtime.init_ray). Each fit runs a training
function that only reports once, so the whole wall time is Ray Train's own. The phases come from the
driver's clock and from Ray Train's controller log (its "[Worker Group Initialization] ... in X s" lines):

- controller: `fit()` called until the controller actor logs its first line (a new process importing Ray Train);
- worker actors: the Train workers' processes started (`RayTrainWorker`, one per worker);
- train context: the workers' setup, torch.distributed's gloo group included;
- function launch: the training function shipped to the workers and started (its imports);
- end seen: the function returned until the controller notices (it polls every
  RAY_TRAIN_HEALTH_CHECK_INTERVAL_S);
- teardown: workers shut down until `fit()` returns.

Each poll interval (Ray's default 2 s, and reid-ray's 0.5 s) is measured `--repeats` times in turn; the
table gives the median and the range. The load average is printed beside it: above the core count, the
figures are those of a loaded machine. `make bench`'s ray section (`section_ray`: `python -m bench.run --only
ray`) is this script's table, run in its own process, with the cores other processes used meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

PHASES = ("controller", "other setup", "worker actors", "train context", "function launch", "end seen", "teardown")


def _loop(config: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["marks"], "start").write_text(repr(time.time()))
    ray.train.report({"done": 1})
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["marks"], "end").write_text(repr(time.time()))


def _controller_log(session: Path, before: set[Path]) -> list[tuple[float, str]]:
    new = sorted(set(session.glob("logs/train/ray-train-sys-controller-*.log")) - before, key=lambda p: p.stat().st_mtime)
    lines = []
    for line in new[-1].read_text().splitlines():
        d = json.loads(line)
        t = time.mktime(time.strptime(d["asctime"][:19], "%Y-%m-%d %H:%M:%S")) + int(d["asctime"][20:]) / 1000
        lines.append((t, d["message"]))
    return lines


def _seconds(lines, pattern: str) -> float:
    return next(float(m.group(1)) for _, msg in lines if (m := re.search(pattern + r" in ([\d.]+)s", msg)))


def one_fit(workers: int, poll_s: str, session: Path, storage: str) -> dict[str, float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = poll_s  # read by the controller this fit starts
    marks = Path(tempfile.mkdtemp())
    before = set(session.glob("logs/train/ray-train-sys-controller-*.log"))
    trainer = TorchTrainer(_loop, train_loop_config={"marks": str(marks)},
                           scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                                  resources_per_worker={"CPU": 0.9}),
                           run_config=ray.train.RunConfig(name=f"fixed-{time.time_ns()}", storage_path=storage))
    t0 = time.time()
    trainer.fit()
    t_end = time.time()
    start, end = (float((marks / k).read_text()) for k in ("start", "end"))
    log = _controller_log(session, before)
    first = log[0][0]
    group = next(t for t, msg in log if msg.startswith("Attempting to start training worker group"))
    shut = next(t for t, msg in log if msg.startswith("Shutting down"))
    actors, context = _seconds(log, "worker actors created"), _seconds(log, "Train context initialized on workers")
    launch = start - group - actors - context
    return {"controller": first - t0, "other setup": group - first, "worker actors": actors, "train context": context,
            "function launch": launch, "end seen": shut - end, "teardown": t_end - shut, "total": t_end - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--polls", default="2.0,0.5", help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S values, in turn")
    args = ap.parse_args()

    import ray

    from reid_ray.distributed.runtime import init_ray

    load_before = os.getloadavg()[0]
    t0 = time.time()
    init_ray()
    init_s = time.time() - t0
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    storage = tempfile.mkdtemp(prefix="ray-fixed-cost-")
    polls = args.polls.split(",")
    results: dict[str, list[dict]] = {p: [] for p in polls}
    for _ in range(args.repeats):
        for p in polls:  # interleaved, so that a change in the machine's load touches both alike
            results[p].append(one_fit(args.workers, p, session, storage))
    ray.shutdown()
    cores = os.cpu_count()
    load = max(load_before, os.getloadavg()[0])
    print(f"Ray Train fixed cost per run: {args.workers} workers, {args.repeats} fits per poll interval, "
          f"{cores} cores, load average {load:.2f}{' (LOADED: above the core count)' if load > cores else ''}; "
          f"ray.init {init_s:.1f} s (once)")
    print()
    print("| phase | " + " | ".join(f"poll {p} s" for p in polls) + " |")
    print("|---|" + "---|" * len(polls))
    for phase in (*PHASES, "total"):
        cells = []
        for p in polls:
            xs = [r[phase] for r in results[p]]
            cells.append(f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})")
        name = f"**{phase}**" if phase == "total" else phase
        print(f"| {name} | " + " | ".join(cells) + " |")


def section_ray(repeats: int, out: Path, quick: bool = False) -> list[str]:
    proc, seen = harness.run_process([sys.executable, "-m", "bench.bench_ray_fixed_cost", "--repeats", str(repeats)])
    body = proc.stdout.strip().splitlines() if proc.returncode == 0 else [f"failed: {harness.last_error(proc)}"]
    print("\n".join(body), flush=True)
    return ["### The fixed cost of one Ray Train run (`python -m bench.bench_ray_fixed_cost`)" + harness.loaded(seen),
            "", *body, f"Other processes used {seen['others']:.2f} cores on average meanwhile.", ""]


if __name__ == "__main__":
    main()
