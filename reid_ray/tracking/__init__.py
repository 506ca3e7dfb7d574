"""Tracking and reporting: MLflow runs (runs.py, the one writer of a run and its status), the console
and progress display, and the sweep report."""

from reid_ray.tracking.runs import (  # noqa: F401 - the package's names
    resolve_uri, SCHEMES, check_uri, quick_http_failures, git_commit, RUN_KEY, EXPERIMENT_KIND, artifact_root,
    ui_hint, system_tags, find_runs, open_run, start_run, log_metrics, dataset_records, log_datasets, log_model,
    has_datasets, log_figure, log_artifact, log_text, end_run, set_status, with_retries, QUICK_HTTP, RunWriter,
    cmc_plot,
)
