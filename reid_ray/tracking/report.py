"""Sweep results for people: the end-of-sweep table, the best config, and what `reid-ray report` writes
(reid_ray/cli/report.py):

    reid-ray report --experiment "synth-a->synth-b" [--mlflow-uri sqlite:///mlflow.db] [--out reports/]

writes `report.md` (one row per trial: method, swept parameters, target mAP/R1, status) and PNG plots
(target mAP per trial and method; each swept parameter against target mAP) from the MLflow store, the
same runs the MLflow UI shows (`mlflow ui --backend-store-uri sqlite:///mlflow.db`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reid_ray import ReidRayError, atomic_path, write_text_atomic
from reid_ray.config import apply_overrides, to_dict
from reid_ray.config.sweep import Sweep

# --------------------------------------------------------------------------- end of a sweep

@dataclass
class TrialRow:
    trial: str
    config: dict                  # the trial's sample
    status: str                   # completed | stopped by ASHA | error
    epoch: int
    target_mAP: float
    target_R1: float
    source_mAP: float
    run_id: str | None = None     # its MLflow run (found by the trial_id tag)
    score: float = math.nan       # the sweep's metric at the trial's last report (= target_mAP when it ranks on that)
    agreement: float = math.nan   # its ensemble agreement with the other trials at its last epoch (label-free)
    label_free: float = math.nan  # the label-free score shown beside target mAP (TrainConfig.label_free_metric)

    def __post_init__(self):
        if math.isnan(self.score):  # a row built without its sweep's score: a sweep ranked on target mAP
            self.score = self.target_mAP


@dataclass
class SweepOutcome:
    sweep: Sweep
    rows: list[TrialRow]
    folder: Path
    uri: str
    errors: int = 0
    trials: int = 0
    params: list[str] = field(default_factory=list)
    best: TrialRow | None = None
    best_config: str | None = None
    best_trial: str | None = None      # the trial Tune ranked first (ResultGrid.get_best_result on the sweep's metric)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 1 else f"{v:.1f}")
    return str(v)


# the label-free scores' column names on a console
SHORT = {"source_val_mAP": "src-val", "target_probe": "probe", "target_sharpness": "sharp"}


def metric_name(metric: str) -> str:
    """A sweep's reported metric as tables name it: `source_val_mAP_last` -> `source_val_mAP`."""
    return metric.removesuffix("_last")


def markdown_table(rows: list[TrialRow], params: list[str], run_ids: bool = False, metric: str = "target_mAP",
                   labelled: bool = True) -> str:
    """The trials' table: the metric the sweep ranks on, and the target mAP beside it where the target has labels."""
    label_free = metric_name(metric) != "target_mAP"
    agreement = any(not math.isnan(r.agreement) for r in rows)
    head = ["trial", *params, *([f"{metric_name(metric)} (ranked on)"] if label_free else []),
            *(["ensemble agreement"] if agreement else []),
            *(["target mAP", "target R1"] if labelled else []), "epochs", "status", *(["MLflow run"] if run_ids else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.trial, *[_fmt(r.config.get(p, "")) for p in params], *([_fmt(r.score)] if label_free else []),
                 *([_fmt(r.agreement)] if agreement else []),
                 *([_fmt(r.target_mAP), _fmt(r.target_R1)] if labelled else []), str(r.epoch), r.status,
                 *([r.run_id or ""] if run_ids else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parallel_coordinates(rows: list[TrialRow], params: list[str], space=None, metric: str = "target_mAP"):
    """Optuna's parallel-coordinates plot of the trials' parameters against the sweep's metric (a matplotlib
    figure), or None with fewer than two scored trials. The trials go into an in-memory Optuna study with the
    search space's distributions (log scale for a loguniform one)."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    scored = [r for r in rows if not math.isnan(r.score) and all(p in r.config for p in params)]
    if len(scored) < 2 or not params:
        return None

    def distribution(name: str):
        spec = space.params.get(name) if space is not None else None
        values = [r.config[name] for r in scored]
        if spec is not None and spec.distribution == "choice":
            return CategoricalDistribution(spec.values)
        if spec is None and not all(isinstance(v, (int, float)) for v in values):
            return CategoricalDistribution(sorted({str(v) for v in values}))
        low, high = min(values), max(values)
        if spec is not None:  # the space's range (the axes a person expects), widened to any value outside it
            low, high = min(low, spec.low), max(high, spec.high)
        if spec is not None and spec.distribution == "int" or all(isinstance(v, int) for v in values):
            return IntDistribution(int(low), max(int(high), int(low) + 1))
        return FloatDistribution(float(low), max(float(high), float(low) * (1 + 1e-9) + 1e-12),
                                 log=spec is not None and spec.distribution == "loguniform")

    dists = {p: distribution(p) for p in params}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        study = optuna.create_study(direction="maximize", study_name="sweep")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for r in scored:
        values = {p: (str(r.config[p]) if isinstance(dists[p], CategoricalDistribution)
                      and str(r.config[p]) in dists[p].choices else r.config[p]) for p in params}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=r.score))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_parallel_coordinate(study, target_name=metric_name(metric).replace("_", " "))
    fig = ax.figure
    fig.set_size_inches(max(6.0, 1.6 * (len(params) + 1)), 4.0)
    fig.tight_layout()
    return fig


def finalize_sweep(out: SweepOutcome, space=None) -> SweepOutcome:
    """Best config YAML, summary Markdown, the parallel-coordinates plot and the parent run's summary (trial
    runs are their rank 0's)."""
    import shutil

    from reid_ray import storage, tracking

    sweep, base, folder, uri = out.sweep, out.sweep.base, out.folder, out.uri
    local = storage.stage(folder)  # the sweep's folder, or under a URI --output a local one uploaded at the end
    rows = sorted(out.rows, key=lambda r: -r.score if not math.isnan(r.score) else math.inf)
    params = sorted({k for r in rows for k in r.config})
    best = next((r for r in rows if r.trial == out.best_trial), None)
    dt, metric, labelled = sweep.direct_transfer, metric_name(sweep.metric), base.target_labelled
    text = [f"# Sweep {sweep.name}: {base.method}, {base.source} -> {base.target_label}\n",
            f"Search space: `{sweep.space_path}`; {len(rows)} trials; ranked by `{metric}` at each trial's last "
            "report" + ("" if metric == "target_mAP" else ", a label-free score" + (
                " (the target mAP beside it is for comparison only: no trial was chosen by it)" if labelled else
                "; the target has no labels, so there is no target mAP")) + ".\n"]
    if dt and labelled:
        text.append(f"Direct transfer (the source model every trial starts from): target mAP "
                    f"{dt.get('target_mAP', float('nan')):.1f}, R1 {dt.get('target_R1', float('nan')):.1f}.\n")
    if sweep.adabn and labelled:
        text.append(f"AdaBN (that model with the target's BatchNorm statistics, no training): target mAP "
                    f"{sweep.adabn.get('target_mAP', float('nan')):.1f}, R1 "
                    f"{sweep.adabn.get('target_R1', float('nan')):.1f}.\n")
    text.append(markdown_table(rows, params, run_ids=True, metric=sweep.metric, labelled=labelled))
    if best is not None:
        cfg = apply_overrides(copy.deepcopy(base), dict(best.config))
        cfg.name, cfg.resume = "", ""
        best_yaml, where = local / "best_config.yaml", folder / "best_config.yaml"
        score = f"{metric} {best.score:.1f}" + (f", target mAP {best.target_mAP:.1f}"
                                                if labelled and metric != "target_mAP" else "")
        write_text_atomic(best_yaml, f"# best trial {best.trial} of sweep {sweep.name}: {score}\n"
                                     f"# python -m reid_ray.train --config {where}\n"
                                     + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        out.best_config = str(where)
        text.append(f"\nBest: trial {best.trial}, {score}; config: `{where}`\n")
        tracking.log_artifact(uri, sweep.parent_run_id, best_yaml)
        best_metrics = {f"best_{metric}": best.score}
        if labelled:
            best_metrics.update(best_target_mAP=best.target_mAP, best_target_R1=best.target_R1)
        tracking.log_metrics(uri, sweep.parent_run_id, best_metrics, step=0)
        from mlflow.tracking import MlflowClient
        MlflowClient(uri).set_tag(sweep.parent_run_id, "best_trial", best.trial)
    if dt and labelled:
        tracking.log_metrics(uri, sweep.parent_run_id, {"direct_transfer_target_mAP": dt.get("target_mAP", 0.0)},
                             step=0)
    if sweep.adabn:
        tracking.log_metrics(uri, sweep.parent_run_id, {f"adabn_{k}": v for k, v in sweep.adabn.items()
                                                         if isinstance(v, (int, float)) and math.isfinite(v)}, step=0)
    fig = parallel_coordinates(rows, params, space, sweep.metric)
    if fig is not None:
        import matplotlib.pyplot as plt

        with atomic_path(local / "parallel_coordinates.png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tracking.log_figure(uri, sweep.parent_run_id, fig, "parallel_coordinates.png")
        text.append(f"\n![parameters against {metric}](parallel_coordinates.png)\n")
    write_text_atomic(local / "summary.md", "\n".join(text))
    tracking.log_artifact(uri, sweep.parent_run_id, local / "summary.md")
    if storage.is_uri(folder):
        storage.upload(local, folder)
        shutil.rmtree(local, ignore_errors=True)
    out.rows, out.params, out.best = rows, params, best
    return out


def short_names(params: list[str]) -> dict[str, str]:
    """`params.alpha` -> `alpha`, `optim.lr` -> `lr`: the last part of each dotted name, unless
    two parameters share it."""
    last = [p.rsplit(".", 1)[-1] for p in params]
    return {p: s if last.count(s) == 1 else p for p, s in zip(params, last)}


def fitted_table(title: str, key_columns: list[str], key_rows: list[list[str]], extra_columns: list[str],
                 extra_rows: list[list[str]], width: int, note: str = ""):
    """A rich Table of the key columns first and as many extra columns as fit `width` without shortening any
    cell; the caption names the columns left out (the full table is in the Markdown summary)."""
    from rich.console import Console
    from rich.table import Table

    def build(n: int) -> Table:
        left = len(extra_columns) - n
        caption = f"{left} more column{'s' * (left != 1)} in {note}" if left and note else None
        table = Table(title=title, caption=caption, title_justify="left")
        for col in [*key_columns, *extra_columns[:n]]:
            table.add_column(col, justify="left" if col in ("trial", "status") else "right", no_wrap=True)
        for key, extra in zip(key_rows, extra_rows):
            table.add_row(*key, *extra[:n])
        return table

    measure = Console(width=10_000)
    for n in range(len(extra_columns), -1, -1):
        table = build(n)
        if measure.measure(table).maximum <= width or n == 0:
            return table
    return build(0)


def print_results(out: SweepOutcome) -> None:
    from rich.console import Console

    sweep, base, dt = out.sweep, out.sweep.base, out.sweep.direct_transfer
    console = Console(highlight=False)
    names = short_names(out.params)
    metric, labelled = metric_name(sweep.metric), base.target_labelled
    label_free = metric != "target_mAP"
    beside = base.label_free_metric if labelled and not label_free else None  # a label-free score beside the mAP
    nan = float("nan")
    key_rows, extra_rows = [], []
    for name, m, what in (("direct transfer", dt, "source model"), ("AdaBN", sweep.adabn, "target BN")):
        if m:
            key_rows.append([name, *([_fmt(m.get(metric, nan))] if label_free else []),
                             *([_fmt(m.get("target_mAP", nan)), _fmt(m.get("target_R1", nan))] if labelled else []),
                             *([_fmt(m.get(beside, nan))] if beside else []), "", what])
            extra_rows.append([""] * len(out.params))
    for r in out.rows:
        key_rows.append([r.trial, *([_fmt(r.score)] if label_free else []),
                         *([_fmt(r.target_mAP), _fmt(r.target_R1)] if labelled else []),
                         *([_fmt(r.label_free)] if beside else []), str(r.epoch), r.status])
        extra_rows.append([_fmt(r.config.get(p, "")) for p in out.params])
    console.print(fitted_table(f"sweep {sweep.name}: {base.method}, {base.source} -> {base.target_label}"
                               + (f", ranked on {metric}" if label_free else ""),
                               ["trial", *([f"{metric} ▼"] if label_free else []),
                                *(["target mAP", "R1"] if labelled else []),
                                *([SHORT.get(beside, beside)] if beside else []), "epochs", "status"], key_rows,
                               [names[p] for p in out.params], extra_rows, console.width,
                               note=str(out.folder / "summary.md")))
    if out.best_config:
        console.print(f"best config: {out.best_config}\n  python -m reid_ray.train --config {out.best_config}",
                      soft_wrap=True)
    from reid_ray.tracking import ui_hint

    console.print(f"MLflow: parent run {sweep.parent_run_id} in {out.uri}\n"
                  f"{ui_hint(out.uri, base.experiment_name)}\n"
                  f"summary: {out.folder / 'summary.md'}", soft_wrap=True)


# --------------------------------------------------------------------------- reid-ray report

def experiment_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ReidRayError(f"no MLflow experiment {experiment!r} in {uri}; found: {', '.join(names) or 'none'}")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    return [r for r in runs if r.data.tags.get("sweep_parent") != "true" and "target_mAP" in r.data.metrics]


def report_experiment(uri: str, experiment: str, out_dir: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = experiment_runs(uri, experiment)
    if not runs:
        raise ReidRayError(f"experiment {experiment!r} has no finished training runs with a target mAP yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_method: dict[str, list] = {}
    for r in runs:
        by_method.setdefault(r.data.tags.get("method", "?"), []).append(r)
    lines = [f"# {experiment}: {len(runs)} runs\n"]
    swept_all = {}
    for method, rs in sorted(by_method.items()):
        keys = sorted({k for r in rs for k in r.data.params})
        swept = [k for k in keys if len({r.data.params.get(k) for r in rs}) > 1
                 and k not in ("name", "init", "resume", "output")]
        swept_all[method] = swept
        rs.sort(key=lambda r: -r.data.metrics["target_mAP"])
        lines.append(f"\n## {method} ({len(rs)} runs)\n")
        head = ["run", *swept, "target mAP", "target R1", "status"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            m = r.data.metrics
            lines.append("| " + " | ".join([r.info.run_name, *[r.data.params.get(k, "") for k in swept],
                                            _fmt(m["target_mAP"]), _fmt(m.get("target_R1", float("nan"))),
                                            r.data.tags.get("status", r.info.status.lower())]) + " |")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (_method, rs) in enumerate(sorted(by_method.items())):
        ax.scatter([i] * len(rs), [r.data.metrics["target_mAP"] for r in rs], alpha=0.7)
    ax.set_xticks(range(len(by_method)), sorted(by_method))
    ax.set_ylabel("target mAP (%)")
    ax.set_title("target mAP per run")
    fig.tight_layout()
    with atomic_path(out / "target_map_by_method.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    lines.append("\n![target mAP per method](target_map_by_method.png)\n")
    for method, swept in swept_all.items():
        for k in swept:
            xs, ys = [], []
            for r in by_method[method]:
                try:
                    xs.append(float(r.data.params[k]))
                    ys.append(r.data.metrics["target_mAP"])
                except (KeyError, ValueError):
                    continue
            if len(xs) < 2:
                continue
            fig, ax = plt.subplots(figsize=(4, 3))
            ax.scatter(xs, ys)
            ax.set_xlabel(k)
            ax.set_ylabel("target mAP (%)")
            ax.set_title(method)
            fig.tight_layout()
            png = f"{method}_{k.replace('.', '_')}.png"
            with atomic_path(out / png) as tmp:
                fig.savefig(tmp, dpi=100)
            plt.close(fig)
            lines.append(f"![{method}: {k}]({png})")
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
