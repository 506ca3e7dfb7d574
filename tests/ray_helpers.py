"""Helpers the fault tests share."""

from __future__ import annotations

import json
from pathlib import Path


def committed_epoch(run_dir: Path) -> int:
    """The last epoch whose checkpoint Ray Train registered in its snapshot (not just copied), 0 if none."""
    try:
        snap = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return max((int(r["metrics"]["epoch"]) for r in snap["checkpoint_results"]), default=0)


# what a fault test prints at the end of the pytest run when Ray did more than the test did (see fault_record)
RECORDS: list[str] = []


def failure_decisions(session_dir: Path) -> list[str]:
    """Ray Train's FailurePolicy decisions of this Ray session, one line each (time, decision, source, count,
    the error's first lines), in time order."""
    out = []
    for log in sorted((Path(session_dir) / "logs" / "train").glob("ray-train-sys-controller-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            msg = rec.get("message", "")
            if msg.startswith("[FailurePolicy]"):
                out.append(f"{rec.get('asctime')} {log.name[25:33]} " + " | ".join(msg.splitlines()[:8])[:900])
    return sorted(out)


def fault_record(session_dir: Path, title: str) -> str:
    """Everything Ray's session logs say about processes that died: the FailurePolicy decisions, each worker
    exit of type SYSTEM_ERROR (a kill, a crash, the kernel's OOM killer) with the last lines of that worker's
    stderr (where PYTHONFAULTHANDLER writes a crash's stacks), and the memory left now."""
    logs = Path(session_dir) / "logs"
    parts = [f"==== {title}", "-- Ray Train failure decisions:", *(failure_decisions(session_dir) or ["(none)"]),
             "-- worker exits of type SYSTEM_ERROR:"]
    gcs = logs / "gcs_server.out"
    exits = [ln for ln in gcs.read_text(errors="replace").splitlines()
             if "Reporting worker exit" in ln and "SYSTEM_ERROR" in ln] if gcs.is_file() else []
    for ln in exits:
        parts.append(ln[:600])
        worker_id = ln.split("worker id = ", 1)[-1].split(",", 1)[0]
        for err in logs.glob(f"worker-{worker_id}-*.err"):
            tail = err.read_text(errors="replace").splitlines()[-25:]
            parts += [f"   {err.name} (last lines):", *(f"   | {t[:300]}" for t in tail)]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        parts.append("-- " + " ".join(ln for ln in meminfo.read_text().splitlines()
                                      if ln.startswith(("MemTotal", "MemAvailable"))))
    return "\n".join(parts)
