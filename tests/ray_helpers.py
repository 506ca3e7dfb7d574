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
