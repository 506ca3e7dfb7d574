"""The bench harness, shared by every benchmark: one timer (`timed`), one process runner (`run_process`,
`script`, `child`) with its load accounting, the figure and plot helpers of the tables, and one writer of
bench/RESULTS.md's generated sections (`write_results`). Each benchmark file (bench/bench_*.py) holds its own
section of `make bench`; bench/run.py runs the sections in turn and writes them.

Every `make bench` measurement runs in its own process, one at a time, so that peaks and caches do not leak
between figures: `child(fn, params)` runs `python -m bench.harness MODULE:FUNCTION PARAMS`, and the inputs are
generated in the child from a seed, identically for both sides of a comparison. A figure is marked LOADED when
other processes than its own used at least OTHERS_LOADED cores on average while it ran: the machine's CPU time
over the figure (/proc/stat) less the figure's own (its process and every descendant it waited for). The load
average, which counts the figure's own threads and decays over a minute, flagged figures that ran alone on a
quiet machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
OTHERS_LOADED = 0.5  # cores used by other processes, on average over a figure, from which it is marked LOADED
ENOUGH_S = 60  # make bench: a first run longer than this is the figure alone (a second adds minutes, not news)


# --------------------------------------------------------------------------- the timer

@dataclass
class Timing:
    """Every timed run's seconds and the last run's value; a figure is their median, with their spread."""
    times: list[float]
    out: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """max - min seconds over the runs."""
        return max(self.times) - min(self.times)


def timed(fn: Callable[[], object], repeats: int, *, warmup: bool = True, sync: Callable[[], None] | None = None,
          enough_s: float | None = None) -> Timing:
    """`fn()` timed `repeats` times.

    warmup: one untimed run first, so worker start-up and first-call costs stay out of the figure (make bench's
    measurements pass False: they run in a fresh process and warm up on smaller inputs where it matters);
    sync: called before the clock starts and before it stops, so a GPU's queued work is inside the figure
    (bench.gpu passes torch.cuda.synchronize);
    enough_s: a first run longer than this is the figure alone (make bench's minute-long peers)."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
        if enough_s is not None and times[0] > enough_s:
            break
    return Timing(times, out)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: write 5 to clear_refs), so a peak is the measured call's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --------------------------------------------------------------------------- the process runner

def load() -> float:
    return os.getloadavg()[0]


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every state of /proc/stat's cpu line but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of the children (and their descendants) it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_process(cmd: list[str], env: dict | None = None,
                timeout: int = 1800) -> tuple[subprocess.CompletedProcess, dict]:
    """Run one figure's process; with the cores other processes used meanwhile, and the load average."""
    t, busy, own, load0 = time.perf_counter(), busy_cpu_s(), own_cpu_s(), load()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    wall = max(time.perf_counter() - t, 1e-9)
    others = max(0.0, (busy_cpu_s() - busy) - (own_cpu_s() - own)) / wall
    return proc, {"others": others, "load": max(load0, load())}


def last_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"]
    return lines[-1][:300]


def script(module: str, args: list[str], env: dict | None = None, timeout: int = 1800) -> dict:
    """Run a bench script in its own process; its last output line, a JSON record, with what else ran
    (`run_process`), or {"error": its last line of output}."""
    proc, seen = run_process([sys.executable, "-m", module, *args], env, timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {"error": last_error(proc), **seen}
    return {**json.loads(lines[-1]), **seen}


def child(fn: Callable[[dict], dict], params: dict, timeout: int = 1800) -> dict:
    """`fn(params)` in a process of its own (this module's main), as `script` runs a bench script."""
    assert fn.__module__ != "__main__", "a measurement must be importable by its module's name"
    return script("bench.harness", [f"{fn.__module__}:{fn.__qualname__}", json.dumps(params)], timeout=timeout)


# --------------------------------------------------------------------------- figures, table rows and plots

def loaded(res: dict) -> str:
    return " LOADED" if res.get("others", 0.0) >= OTHERS_LOADED else ""


def span(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def fig(res: dict) -> str:
    """'median s (min-max, n runs)', with LOADED where other processes took the cores (`loaded`)."""
    if "error" in res:
        return f"failed: {res['error']}"
    xs = res["times"]
    spread = f" ({span(xs)}, {len(xs)} runs)" if len(xs) > 1 else " (1 run)"
    return f"{statistics.median(xs):.2f} s{spread}{loaded(res)}"


def ratio(peer: dict, ours: dict) -> str:
    if "times" not in peer or "times" not in ours:
        return "-"
    return f"{statistics.median(peer['times']) / statistics.median(ours['times']):.2f}×"


def row(lines: list[str], pts: dict, x: float, results: dict[str, dict], line: str) -> None:
    """One table row: each named result's median as a point at size x, and the line printed as it lands."""
    for name, r in results.items():
        if "times" in r:
            pts.setdefault(name, []).append((x, statistics.median(r["times"])))
    lines.append(line)
    print(line, flush=True)


def script_row(lines: list[str], module: str, args: list[str], first: str, columns: int, fmt, env=None) -> dict:
    """Run a bench script (`script`), turn its record into a table row with `fmt` (or a failed row of `columns`
    cells after `first`), and add the row to `lines` as it lands."""
    r = script(module, args, env)
    line = (f"| {first} | failed: {r['error']} |" + " |" * (columns - 2)) if "error" in r else fmt(r)
    lines.append(line)
    print(line, flush=True)
    return r


def plot(path: Path, title: str, xlabel: str, series: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reid_ray import atomic_path

    fig_, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="seconds (median)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig_.tight_layout()
    with atomic_path(path) as part:
        fig_.savefig(part, format="png", dpi=100)
    plt.close(fig_)


def finish(lines: list[str], out: Path, name: str, title: str, xlabel: str, pts: dict) -> list[str]:
    """A section's table closed by its plot, bench-NAME.png beside the results file."""
    plot(out / f"bench-{name}.png", f"{title}: time against size", xlabel, pts)
    return [*lines, "", f"![{title} scaling](bench-{name}.png)", ""]


# --------------------------------------------------------------------------- the RESULTS.md writer

BEGIN, END = "<!-- make bench: begin (generated by python -m bench.run) -->", "<!-- make bench: end -->"


def marked(text: str, start: str, end: str) -> tuple[str, str, str] | None:
    """(before `start`, between the two, after `end`) of text's first start ... end block; None without one.
    Also bench.leaderboard's: every generated block of RESULTS.md is found one way."""
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if j < 0:
        return None
    return text[:i], text[i + len(start):j], text[j + len(end):]


def section_marks(name: str) -> tuple[str, str]:
    return f"<!-- bench.run section {name} -->", f"<!-- bench.run section {name} end -->"


def write_results(header: list[str], sections: dict[str, list[str]], order: tuple[str, ...],
                  results: Path = RESULTS) -> None:
    """The generated part of RESULTS.md: its header, and each section run replaced in place (the sections not
    run keep their last figures, each with its own date), in `order`; added after the file's preamble the first
    time. Written atomically."""
    from reid_ray import write_text_atomic

    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    parts = marked(text, BEGIN, END)
    if parts:
        head, old, tail = parts
    else:
        first = text.find("\n## ")
        head, old, tail = (text + "\n\n", "", "\n") if first < 0 else (text[:first + 1], "", "\n" + text[first:])
    kept = {}
    for name in order:
        if (old_section := marked(old, *section_marks(name))) is not None:
            kept[name] = old_section[1].strip("\n").splitlines()
    kept.update(sections)
    body = [BEGIN, *header]
    for name in order:
        if name in kept:
            body += [section_marks(name)[0], *kept[name], section_marks(name)[1], ""]
    write_text_atomic(results, head + "\n".join([*body, END]) + tail)


def main(argv=None) -> None:
    """`python -m bench.harness MODULE:FUNCTION PARAMS`: one measurement (`child`), its record as JSON."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("target", metavar="MODULE:FUNCTION")
    ap.add_argument("params", help="the function's one argument, as JSON")
    args = ap.parse_args(argv)
    module, name = args.target.split(":")
    print(json.dumps(getattr(importlib.import_module(module), name)(json.loads(args.params))))


if __name__ == "__main__":
    main()
