"""Who used the cores: CPU time per process class, sampled from /proc while a benchmark runs (Linux only).

    with ProcessCPU() as cpu:
        ...                                   # the work, e.g. a Ray Train run
    cpu.cores(t0, t1)                         # {"train worker": 1.4, "ray daemons": 0.5, ...} over a window

A thread reads every process's utime + stime (/proc/<pid>/stat) every `interval` s and keeps the series;
a window's figure per class is the CPU seconds its processes spent between two sample times, over the
window's wall time. Processes are classed by their command line (Ray names its workers `ray::<Actor>`).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def classify(pid: int, cmdline: str) -> str:
    """The class of a process: this benchmark, Ray's train worker or controller, Ray's other processes, other."""
    if pid == os.getpid():
        return "driver"
    if "RayTrainWorker" in cmdline:
        return "train worker"
    if "TrainController" in cmdline or "ray::" in cmdline:
        return "ray actors"
    if "ray" in cmdline:  # raylet, gcs_server, dashboard, log monitor, runtime-env agent, ...
        return "ray daemons"
    return "other"


def _cpu_s(pid: str) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]; utime, stime 11, 12
    return (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ProcessCPU:
    """Samples per-class cumulative CPU seconds in a thread; `cores(t0, t1)` averages a window."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.times: list[float] = []          # time.time() of each sample (MLflow's metric timestamps: ms of it)
        self.series: list[dict[str, float]] = []  # per sample: class -> CPU s of processes alive since the start
        self._last: dict[str, tuple[str, float]] = {}  # pid -> (class, last CPU s seen): exited processes keep theirs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            cpu = _cpu_s(pid)
            if cpu is None:
                continue
            self._last[pid] = (classify(int(pid), _cmdline(pid)), cpu)  # again each time: ray::IDLE becomes a worker
        total: dict[str, float] = {}
        for cls, cpu in self._last.values():
            total[cls] = total.get(cls, 0.0) + cpu
        self.times.append(time.time())
        self.series.append(total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessCPU:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def cores(self, t0: float | None = None, t1: float | None = None) -> dict[str, float]:
        """Average cores per class between the samples nearest after t0 and t1 (time.time() values)."""
        i0 = 0 if t0 is None else min(bisect.bisect_left(self.times, t0), len(self.times) - 1)
        i1 = len(self.times) - 1 if t1 is None else min(bisect.bisect_left(self.times, t1), len(self.times) - 1)
        wall = self.times[i1] - self.times[i0]
        if wall <= 0:
            return {}
        a, b = self.series[i0], self.series[i1]
        return {cls: round((b.get(cls, 0.0) - a.get(cls, 0.0)) / wall, 3) for cls in sorted(set(a) | set(b))}
