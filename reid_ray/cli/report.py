"""`reid-ray report`: a Markdown table and PNG plots comparing the runs of an MLflow experiment
(tracking/report.py writes them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid-ray report", description="Markdown table + PNG plots of an MLflow experiment")
    p.add_argument("--experiment", required=True, help='e.g. "synth-a->synth-b" (runs of every method on that pair)')
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--out", default=None, help="output folder (default: reports/<experiment>)")
    return p


def main(argv=None) -> int:
    from reid_ray.cli import run_cli

    args = build_parser().parse_args(argv)

    def _run(a):
        from reid_ray.tracking import resolve_uri
        from reid_ray.tracking.report import report_experiment

        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in a.experiment)
        path = report_experiment(resolve_uri(a.mlflow_uri or ""), a.experiment, a.out or Path("reports") / safe)
        print(f"wrote {path}")
        return 0

    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
