"""One leaderboard: every method over seeds on the embedded benchmark, from each seed's shared source models.

    python -m bench.leaderboard [--seeds 0 1 2] [--data-root data] [--rows mmt-kmeans ecn ...] [--results]

Rows: direct transfer and AdaBN (the seed's BoT baseline, no training on the target), each UDA method at its
embedded defaults, MMT with k-means and with DBSCAN pseudo-labels, MMT from SAN source models, the fully
unsupervised setting (`usl-*`: random weights, the target alone), and the upper bound (synth-b's own labels).
Every UDA run starts from the seed's source models (bench_uda's `baseline-s<seed>`, MMT's second net from
seed + 1), runs under Ray Train with the benchmark's workers, and reports its **last** epoch (no model selection
on target labels).

Each (row, seed) is recorded in `bench/records/<benchmark>/<row>-s<seed>.json` once finished (committed: a few
hundred bytes each, so a new checkout keeps them), and a rerun reuses it, so the table can be filled row by row.
The runs and source models themselves stay in `bench/out/leaderboard/<benchmark>/` (ignored). Prints the table and
writes, beside the runs, `leaderboard.md`, and `bench/leaderboard-<benchmark>.png` (mean target mAP with the seeds'
spread), logs both to MLflow as one run (experiment `leaderboard`) and, with `--results`, rewrites the benchmark's
section of bench/RESULTS.md. A row with no record there keeps its line of the section's committed table (marked †),
and the plot reads its per-seed column, so rerunning some rows never drops the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_uda import baseline
from bench.harness import marked
from reid_ray import write_text_atomic
from reid_ray.config import resolve_config
from reid_ray.distributed.driver import run_training
from reid_ray.methods import METHODS
from reid_ray.tracking.console import set_verbose
from reid_ray.training.checkpoint import CHECKPOINT_FILE

MLFLOW_URI = "sqlite:///bench/out/mlflow.db"
RECORDS = Path("bench/records")
RESULTS = Path("bench/RESULTS.md")


@dataclass
class Row:
    key: str
    label: str
    method: str | None = None           # None: read from the seed's baseline record
    sets: dict = field(default_factory=dict)
    source: str = "baseline"            # baseline | san: the source models it starts from | none: no source at all


ROWS = [
    Row("direct", "direct transfer (BoT baseline)"),
    Row("adabn", "AdaBN (baseline + target BN statistics)"),
    # MMT's default BatchNorm batch is the authors' 16 images (model.samples_per_bn); the -bn64 rows normalise
    # over the whole global batch of 64
    Row("mmt-kmeans", "MMT, k-means", "mmt", {"params.cluster_algorithm": "kmeans"}),
    Row("mmt-dbscan", "MMT, DBSCAN", "mmt", {"params.cluster_algorithm": "dbscan"}),
    Row("mmt-kmeans-bn64", "MMT, k-means, BN over the global 64", "mmt",
        {"params.cluster_algorithm": "kmeans", "model.samples_per_bn": 0}),
    Row("mmt-dbscan-bn64", "MMT, DBSCAN, BN over the global 64", "mmt",
        {"params.cluster_algorithm": "dbscan", "model.samples_per_bn": 0}),
    Row("ecn", "ECN", "ecn"),
    Row("mar", "MAR", "mar"),
    Row("spcl", "SpCL", "spcl"),
    Row("cluster_contrast", "Cluster Contrast", "cluster_contrast"),
    Row("san-mmt", "MMT from SAN source models", "mmt", source="san"),
    *(Row(f"usl-{m}", f"{label}, no source", m, source="none")  # the fully unsupervised setting, from random weights
      for m, label in (("self_training", "k-means self-training"), ("spcl", "SpCL"), ("cluster_contrast", "Cluster Contrast"))),
    Row("supervised", "supervised on the target (upper bound)", "baseline"),
]
UDA = {"mmt-kmeans", "mmt-dbscan", "mmt-kmeans-bn64", "mmt-dbscan-bn64", "ecn", "mar", "spcl", "cluster_contrast",
       "san-mmt"}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curve(uri: str, run_id: str | None, key: str = "target_mAP") -> list[float]:
    """The run's per-evaluation target mAP, from MLflow."""
    if not run_id:
        return []
    from mlflow.tracking import MlflowClient
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


class Leaderboard:
    def __init__(self, data_root: str, workers: int, tag: str):
        self.data_root, bench = data_root, Path(data_root).name + tag
        self.out, self.records, self.bench = Path("bench/out/leaderboard") / bench, RECORDS / bench, bench
        # source models: bench_uda's shared records for the default benchmark, the leaderboard's own otherwise
        self.sources = "bench/out/uda" if Path(data_root).resolve() == Path("data").resolve() else str(self.out / "sources")
        self.common = dict(data_root=data_root, workers=workers, mlflow_uri=MLFLOW_URI, experiment=f"leaderboard-{bench}")

    def source_model(self, kind: str, seed: int) -> dict:
        if kind == "baseline":
            return baseline(seed, {**self.common, "output": self.sources})
        record = Path(self.sources) / f"san-s{seed}.json"
        if record.is_file():
            return json.loads(record.read_text())
        cfg = resolve_config("san", flags=dict(seed=seed, name=f"san-s{seed}", output=self.sources, **self.common))
        out = run_training(cfg)
        rec = {"metrics": out["metrics"], "init": str(Path(out["checkpoint"]) / CHECKPOINT_FILE)}
        write_text_atomic(record, json.dumps(rec, indent=1))
        return rec

    def result(self, row: Row, seed: int) -> dict:
        record = self.records / f"{row.key}-s{seed}.json"
        if record.is_file():
            return json.loads(record.read_text())
        base = self.source_model("baseline", seed) if row.source != "none" else None
        if row.method is None:
            m = base["metrics"] if row.key == "direct" else base["adabn"]
            rec = {"target_mAP": m["target_mAP"], "target_R1": m["target_R1"], "source_mAP": base["metrics"]["source_mAP"],
                   "wall_time": None, "curve": []}
        else:
            flags = dict(seed=seed, name=f"{row.key}-s{seed}", output=str(self.out / "runs"), **self.common)
            if row.key == "supervised":
                cfg = resolve_config("baseline", source="synth-b", target="synth-b", flags=flags)
            else:
                cfg = resolve_config(row.method, "none" if row.source == "none" else None, flags=flags, sets=row.sets)
                n = METHODS[row.method].source_models(cfg.params)
                cfg.init = [self.source_model(row.source, seed + i)["init"] for i in range(n)]
            out = run_training(cfg)
            m = out["metrics"]
            rec = {"target_mAP": m["target_mAP"], "target_R1": m["target_R1"], "source_mAP": m.get("source_mAP"),
                   "wall_time": out["wall_time"], "curve": curve(out["mlflow_uri"], out["mlflow_run_id"]),
                   "pseudo_nmi": m.get("pseudo_nmi"), "pseudo_clusters": m.get("pseudo_clusters"),
                   # each evaluated network's target mAP (MMT: both mean nets; the row reports the first)
                   "nets": {k[len("target_mAP_"):]: v for k, v in m.items() if k.startswith("target_mAP_")}}
        rec.update(row=row.key, seed=seed, date=time.strftime("%Y-%m-%d %H:%M"))
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps(rec, indent=1))
        return rec


def _markers(bench: str) -> tuple[str, str]:
    return f"<!-- leaderboard:{bench} -->", f"<!-- /leaderboard:{bench} -->"


def committed_lines(bench: str, path: Path = RESULTS) -> dict[str, str]:
    """This benchmark's table lines in RESULTS.md by row key (a footnote mark or † after the label is ignored)."""
    section = marked(path.read_text() if path.is_file() else "", *_markers(bench))
    if section is None:
        return {}
    keys = {r.label: r.key for r in ROWS}
    lines = {}
    for line in section[1].splitlines():
        cells = line.split("|")
        label = cells[1].strip().rstrip("\\*†").strip() if len(cells) > 2 else ""
        if label in keys and "not run" not in line:
            lines[keys[label]] = line
    return lines


def carried_seeds(line: str) -> list[float]:
    """The target mAP per seed of a committed table line (its last column: '74.7 / 72.8 / 72.4')."""
    return [float(v) for v in line.rstrip(" |").rsplit("|", 1)[1].split("/")]


def table(rows: list[Row], results: dict[str, list[dict]], carried: dict[str, str] | None = None) -> tuple[str, dict]:
    """The Markdown table and, per row, (mean, sd) of target mAP. A row without results keeps its `carried` line."""
    carried = carried or {}
    stats = {}
    adabn = (mean_sd([r["target_mAP"] for r in results["adabn"]])[0] if results.get("adabn") else
             mean_sd(carried_seeds(carried["adabn"]))[0] if "adabn" in carried else None)
    lines = ["| method | seeds | target mAP | target R1 | − AdaBN | source mAP | wall time / run | target mAP per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        res = results.get(row.key, [])
        if not res and row.key in carried:
            cells = carried[row.key].split("|")
            cells[1] = f" {cells[1].strip().rstrip('†')}† "  # its footnote mark, if any, kept
            lines.append("|".join(cells))
            stats[row.key] = mean_sd(carried_seeds(carried[row.key]))
            continue
        if not res:
            lines.append(f"| {row.label} | 0 | not run | | | | | |")
            continue
        m, sd = mean_sd([r["target_mAP"] for r in res])
        r1, r1_sd = mean_sd([r["target_R1"] for r in res])
        src = [r["source_mAP"] for r in res if r.get("source_mAP") is not None]
        walls = [r["wall_time"] for r in res if r.get("wall_time")]
        stats[row.key] = (m, sd)
        gain = f"{m - adabn:+.1f}" if adabn is not None and row.key != "adabn" else ""
        wall = f"{statistics.mean(walls):.0f} s" if walls else "(its baseline's)"
        per_seed = " / ".join(f"{r['target_mAP']:.1f}" for r in res)
        source = f"{statistics.mean(src):.1f}" if src else ""
        lines.append(f"| {row.label} | {len(res)} | {m:.1f} ± {sd:.1f} | {r1:.1f} ± {r1_sd:.1f} | {gain} | "
                     f"{source} | {wall} | {per_seed} |")
    return "\n".join(lines), stats


def plot(rows: list[Row], results: dict[str, list[dict]], path: Path, title: str,
         carried: dict[str, str] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = {r.key: [x["target_mAP"] for x in results[r.key]] for r in rows if results.get(r.key)}
    seeds |= {k: carried_seeds(line) for k, line in (carried or {}).items() if k not in seeds}
    shown = [r for r in rows if r.key in seeds]
    means = [mean_sd(seeds[r.key]) for r in shown]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2))
    y = range(len(shown))
    ax.barh(y, [m for m, _ in means], xerr=[s for _, s in means], color=["#999" if r.key not in UDA else "#3a7"
                                                                          for r in shown], capsize=3)
    for i, r in enumerate(shown):  # each seed as a dot: the spread behind the error bar
        ax.plot(seeds[r.key], [i] * len(seeds[r.key]), "k.", ms=4)
    ax.set_yticks(list(y), [r.label + ("" if results.get(r.key) else "†") for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel("target mAP (last epoch; bar: mean, line: ± sd, dots: seeds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def log_mlflow(bench: str, md: str, png: Path, stats: dict, seeds: list[int]) -> None:
    import mlflow

    mlflow.set_tracking_uri(MLFLOW_URI)
    mlflow.set_experiment("leaderboard")
    with mlflow.start_run(run_name=f"leaderboard-{bench}"):
        mlflow.log_params({"benchmark": bench, "seeds": " ".join(map(str, seeds))})
        mlflow.log_metrics({f"{k}_target_mAP": m for k, (m, _) in stats.items()} |
                           {f"{k}_target_mAP_sd": s for k, (_, s) in stats.items()})
        mlflow.log_text(md, "leaderboard.md")
        mlflow.log_artifact(str(png))


def update_results(bench: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md. The old section's
    footnotes (paragraphs starting with a `\\*` mark) stay, placed before the figure, while a row of the new
    table still carries their mark."""
    start, end = _markers(bench)
    old = path.read_text()
    section = marked(old, start, end)
    if section and "\\*" in text:
        paragraphs = section[1].strip().split("\n\n")
        notes = [p for p in paragraphs if p.startswith("\\*") and p not in text]
        if notes:
            head, sep, figure = text.rpartition("\n\n![")
            text = "\n\n".join([head if sep else text, *notes]) + (sep + figure if sep else "")
    block = f"{start}\n{text}\n{end}"
    write_text_atomic(path, section[0] + block + section[2] if section else old.rstrip() + "\n\n" + block + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-root", default="data", help="the benchmark (reid-ray synth DIR --seed ... --train-ids ...)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", nargs="+", default=[r.key for r in ROWS], choices=[r.key for r in ROWS])
    ap.add_argument("--tag", default="", help="suffix of the benchmark's record folder (a rerun with new settings)")
    ap.add_argument("--results", action="store_true", help="rewrite this benchmark's section of bench/RESULTS.md")
    ap.add_argument("--table-only", action="store_true", help="no training: the table from the finished records")
    args = ap.parse_args(argv)
    set_verbose(False)  # what the CLI prints: no Ray start-up notes, no MLflow INFO lines
    Path("bench/out").mkdir(parents=True, exist_ok=True)  # the MLflow database's folder (none in a fresh checkout)
    board = Leaderboard(args.data_root, args.workers, args.tag)
    rows = [r for r in ROWS if r.key in args.rows]  # the table's order
    results: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: args.rows.index(r.key)):  # --rows' order; a row's seeds together
        for seed in args.seeds:
            if args.table_only and not (board.records / f"{row.key}-s{seed}.json").is_file():
                continue
            t = time.perf_counter()
            res = board.result(row, seed)
            results.setdefault(row.key, []).append(res)
            print(f"seed {seed} {row.label}: target mAP {res['target_mAP']:.1f} R1 {res['target_R1']:.1f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    # every row of the table: the ones not asked for (or not finished) keep their committed line
    carried = {k: v for k, v in committed_lines(board.bench).items() if k not in results}
    everything = [r for r in ROWS if r.key in results or r.key in carried]
    md, stats = table(everything, results, carried)
    board.out.mkdir(parents=True, exist_ok=True)
    png = Path("bench") / f"leaderboard-{board.bench}.png"  # tracked, beside RESULTS.md
    title = f"{board.bench}: synth-a → synth-b, seeds {', '.join(map(str, args.seeds))}"
    plot(everything, results, png, title, carried)
    header = (f"`python -m bench.leaderboard --seeds {' '.join(map(str, args.seeds))} --data-root {args.data_root}"
              f"{' --rows ' + ' '.join(args.rows) if set(args.rows) != {r.key for r in ROWS} else ''}"
              f"{' --tag ' + args.tag if args.tag else ''}` ({platform.node()}, {time.strftime('%Y-%m-%d')}; "
              f"{args.workers} Ray Train workers; last epoch, no model selection on target labels; records in "
              f"`{board.records}`"
              f"{'; † a row carried over from the previous table, not rerun' if carried else ''})\n\n")
    write_text_atomic(board.out / "leaderboard.md", header + md + "\n")
    print(md)
    log_mlflow(board.bench, header + md, png, stats, args.seeds)
    if args.results:
        update_results(board.bench, header + md + f"\n\n![leaderboard {board.bench}]({png.name})")


if __name__ == "__main__":
    main()
