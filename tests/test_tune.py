"""Sweeps: search-space YAML checks, resource planning, --config files (Ray-free), and one
2-trial Ray Tune + Optuna + ASHA sweep end to end with its MLflow parent/child runs."""

import math
import re
from pathlib import Path

import pytest
import yaml

from reid_ray import ReidRayError
from reid_ray.config import load_config_file, resolve_config
from reid_ray.config.search_space import default_path, load_search_space
from reid_ray.distributed.resources import plan_resources
from tests.conftest import run_cli


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("method", ["baseline", "mmt", "ecn", "mar", "san", "spcl", "cluster_contrast", "self_training"])
def test_shipped_search_spaces_are_valid(method):
    space = load_search_space(default_path(method), resolve_config(method))
    assert space.params and all(p.line > 0 for p in space.params.values())
    real = default_path(method, real=True)
    assert real.parent.name == "real" and real != default_path(method)
    real_space = load_search_space(real, resolve_config(method, preset="duke2market"))
    assert real_space.params and "edit" not in real_space.text.lower()


def test_a_preset_sweep_reads_the_real_benchmarks_search_space(tmp_path):
    from reid_ray.cli.tune import build_parser, prepare_sweep

    a = build_parser().parse_args(["--method", "mmt", "--preset", "duke2market", "--output", str(tmp_path)])
    sweep = prepare_sweep(a)
    assert sweep.space_path.endswith("real/mmt.yaml") and "low: 400, high: 900" in sweep.space_text
    assert sweep.base.params.num_clusters == 500 and sweep.num_samples == 16
    # a preset whose target has its own scale has its own space (MSMT17: k around the paper's 1,500)
    msmt = prepare_sweep(build_parser().parse_args(["--method", "mmt", "--preset", "market2msmt", "--output",
                                                    str(tmp_path)]))
    assert msmt.space_path.endswith("real/mmt-market2msmt.yaml") and "low: 1000, high: 2000" in msmt.space_text
    assert msmt.base.params.num_clusters == 1500
    a = build_parser().parse_args(["--method", "mmt", "--output", str(tmp_path)])
    assert prepare_sweep(a).space_path.endswith("search_spaces/mmt.yaml")  # the embedded benchmark's


def test_search_space_reads_distributions_and_fixed(tmp_path):
    path = write(tmp_path, "params:\n  # k\n  params.num_clusters: {distribution: int, low: 8, high: 16}\n"
                           "  optim.lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
                           "  model.arch: {distribution: choice, values: [small, resnet18]}\n"
                           "fixed:\n  epochs: 3\n")
    space = load_search_space(path, resolve_config("mmt"))
    assert space.params["params.num_clusters"].describe() == "int[8, 16]"
    assert space.params["params.num_clusters"].line == 3
    assert space.params["model.arch"].values == ["small", "resnet18"]
    assert space.fixed == {"epochs": 3}


@pytest.mark.parametrize("text, message", [
    ("params:\n  params.beta: {distribution: uniform, low: 0.1, high: 0.2}\n",
     r"line 2: unknown parameter 'params.beta'; valid names: the method's params.adabn_init, params.alpha"),
    ("params:\n  optim.lr: {distribution: gaussian, low: 0.1, high: 0.2}\n", "line 2: .*unknown distribution 'gaussian'"),
    ("params:\n  optim.lr: {distribution: loguniform, low: 0, high: 0.2}\n", "loguniform needs low > 0"),
    ("params:\n  optim.lr: {distribution: uniform, low: 1e-4, high: 0.2}\n", "write 1.0e-4"),
    ("params:\n  optim.lr: {distribution: uniform, low: 0.3, high: 0.2}\n", "must be below high"),
    ("params:\n  optim.lr: {distribution: uniform, low: 0.1, high: 0.2\n", "line 3: not valid YAML"),
    ("search:\n  optim.lr: 1\n", "unknown section"),
    ("params:\n  model.arch: {distribution: choice, values: []}\n", "non-empty list"),
    ("params:\n  optim.lr: {distribution: uniform, low: 0.1, high: 0.2}\nfixed:\n  epochz: 3\n",
     "line 4: unknown parameter 'epochz'"),
])
def test_search_space_mistakes_name_the_line_and_the_fix(tmp_path, text, message):
    with pytest.raises(ReidRayError, match=message):
        load_search_space(write(tmp_path, text), resolve_config("mmt"))


def test_missing_search_space_names_the_shipped_folder(tmp_path):
    with pytest.raises(ReidRayError, match="no such file.*search_spaces"):
        load_search_space(tmp_path / "nope.yaml", resolve_config("mmt"))


def test_plan_fits_one_trial_on_two_cpus_and_many_on_a_gpu_cluster():
    small = plan_resources({"CPU": 2}, workers=2, gpus_per_worker=0, uses_actor=True)
    total = small.trial[0]["CPU"] + small.trial[1]["CPU"] + 2 * small.worker["CPU"]
    assert small.concurrent == 1 and total <= 2 and not small.use_gpu
    assert small.actor == {"num_cpus": small.trial[1]["CPU"]}
    big = plan_resources({"CPU": 64, "GPU": 8}, workers=2, gpus_per_worker=1, uses_actor=True)
    assert big.concurrent == 3 and big.worker["GPU"] == 1  # 3 × (2 + 0.25) GPUs ≤ 8
    assert 3 * (2 * big.worker["CPU"] + sum(b["CPU"] for b in big.trial)) <= 64
    assert plan_resources({"CPU": 64, "GPU": 8}, 2, 1, True, max_concurrent=2).concurrent == 2
    # 8 × g5.2xlarge (8 CPUs, 1 GPU each): a worker asks for at most 7 CPUs, or it fits on no node
    capped = plan_resources({"CPU": 72, "GPU": 8}, 2, 1, True, cpu_per_gpu=8.0)
    assert capped.worker == {"CPU": 7.0, "GPU": 1}
    assert plan_resources({"CPU": 16}, 2, 0, False).concurrent == 7
    with pytest.raises(ReidRayError, match="--gpus-per-worker 0"):
        plan_resources({"CPU": 8}, 2, 1, True)
    with pytest.raises(ReidRayError, match="--workers-per-trial between 1 and 2"):
        plan_resources({"CPU": 2}, 3, 0, True)
    # one GPU, one worker: it asks for 0.75 GPU, so the actor's 0.25 fits beside it (tests/test_gpu_plan.py)
    one = plan_resources({"CPU": 8, "GPU": 1}, 1, 1, True, max_concurrent=1, workers_flag="--workers")
    assert one.worker["GPU"] == 0.75 and one.actor == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert one.trial[1] == {"CPU": 1.0, "GPU": 0.25}
    with pytest.raises(ReidRayError, match="pass --workers 1"):
        plan_resources({"CPU": 8, "GPU": 1}, 2, 1, True, max_concurrent=1, workers_flag="--workers")


def test_config_file_round_trip_and_errors(tmp_path):
    from reid_ray.config import to_dict

    cfg = resolve_config("mmt", sets={"params.num_clusters": 42, "optim.lr": 1e-4})
    path = write(tmp_path, yaml.safe_dump(to_dict(cfg)), "best.yaml")
    method, source, target, overrides = load_config_file(str(path))
    again = resolve_config(method, source, target, file=overrides)
    assert to_dict(again) == to_dict(cfg)
    with pytest.raises(ReidRayError, match="no such file"):
        load_config_file(str(tmp_path / "missing.yaml"))
    with pytest.raises(ReidRayError, match="expected a mapping"):
        load_config_file(str(write(tmp_path, "- 1\n- 2\n", "list.yaml")))


# --------------------------------------------------------------------------- end to end under Ray

@pytest.mark.ray
def test_two_trial_sweep_end_to_end(cli_sweep, tmp_path):
    """The CLI sweep of conftest (Optuna + ASHA, 2 MMT trials), then the same command again: it resumes."""
    from mlflow.tracking import MlflowClient

    from reid_ray.tracking.report import report_experiment

    assert cli_sweep.proc.returncode == 0, cli_sweep.text
    uri, out = cli_sweep.uri, cli_sweep.root / "out"
    folder = out / "tune" / "t"
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert best["method"] == "mmt" and 8 <= best["params"]["num_clusters"] <= 16 and best["epochs"] == 2
    # both source models were pretrained once, before the trials, and the trials started from them
    assert len(best["init"]) == 2 and best["init"][0] != best["init"][1] and all(
        (out / "pretrain" / Path(p).name).is_file() for p in best["init"])
    assert "| trial |" in (folder / "summary.md").read_text()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("synth-a->synth-b")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == 2
    assert {r.data.tags["status"] for r in children} <= {"completed", "stopped by ASHA"}
    # no trial's run is left RUNNING: completed ones by their rank 0, ASHA-stopped ones by the sweep's callback
    assert {(r.data.tags["status"], r.info.status) for r in children} <= {("completed", "FINISHED"),
                                                                         ("stopped by ASHA", "KILLED")}
    assert all(r.info.run_id in (folder / "summary.md").read_text() for r in children)  # found by trial_id
    for r in children:  # trials evaluate the target every epoch, the source only at their last one
        if r.data.tags["status"] == "completed":
            hist = {k: [m.step for m in client.get_metric_history(r.info.run_id, k)] for k in ("source_mAP", "target_mAP")}
            assert hist == {"source_mAP": [2], "target_mAP": [1, 2]}, hist
    assert {r.data.tags["trial_id"] for r in children} and all("params.num_clusters" in r.data.params for r in children)
    assert not math.isnan(parent[0].data.metrics["best_target_mAP"])
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"best_config.yaml", "search_space.yaml", "summary.md", "parallel_coordinates.png"} <= arts

    # what the MLflow UI shows: the model-training view, system tags, datasets, the CMC figure, the best model
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    for r in [*parent, *children]:
        assert r.data.tags.get("mlflow.user") and r.data.tags.get("mlflow.source.name"), r.data.tags
    for r in children:
        inputs = {(d.dataset.name, d.tags[0].value) for d in r.inputs.dataset_inputs}
        assert inputs == {("synth-a", "source"), ("synth-b", "target")}, inputs
    completed = [r for r in children if r.data.tags["status"] == "completed"]  # an ASHA-stopped one is killed early
    assert "cmc.png" in {a.path for a in client.list_artifacts(completed[0].info.run_id)}
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{completed[0].info.run_id}'")
    assert len(models) == 1 and {m.key for m in models[0].metrics} >= {"best_target_mAP"}
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(uri)  # where models:/ resolves
    try:
        embedder = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    finally:
        mlflow.set_tracking_uri(None)
    assert embedder(torch.rand(3, 3, 64, 32)).shape[0] == 3  # any batch size

    # the sweep's best config trains as is, and the report reads the same store
    method, source, target, overrides = load_config_file(str(folder / "best_config.yaml"))
    assert resolve_config(method, source, target, file=overrides).params.num_clusters == best["params"]["num_clusters"]
    report = report_experiment(uri, "synth-a->synth-b", tmp_path / "report")
    text = report.read_text()
    assert "## mmt" in text and "## baseline" in text and (tmp_path / "report" / "target_map_by_method.png").exists()

    # rerunning with the same name resumes: finished trials are not rerun
    again = run_cli(cli_sweep.argv, cli_sweep.root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len([r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]) == 2


def test_cpus_per_gpu_is_the_tightest_gpu_node():
    from reid_ray.distributed.resources import cpus_per_gpu

    nodes = [{"Alive": True, "Resources": {"CPU": 8, "GPU": 1}}, {"Alive": True, "Resources": {"CPU": 48, "GPU": 4}},
             {"Alive": True, "Resources": {"CPU": 8}}, {"Alive": False, "Resources": {"CPU": 2, "GPU": 1}}]
    assert cpus_per_gpu(nodes) == 8.0
    assert cpus_per_gpu([{"Alive": True, "Resources": {"CPU": 4}}]) == math.inf


@pytest.mark.parametrize("method", ["mmt", "ecn"])
def test_synthetic_sweep_is_short_and_ranks_on_the_target(method, tmp_path):
    from reid_ray.cli.tune import build_parser, prepare_sweep

    a = build_parser().parse_args(["--method", method, "--output", str(tmp_path), "--num-samples", "2"])
    a.gpus_per_worker = 0.0
    base = prepare_sweep(a).base
    assert base.epochs == 3 and base.workers == 1 and base.eval_source is False
    # MMT's second source model is left out of the demo; methods without the parameter do not get it
    assert getattr(base.params, "two_sources", "absent") == (False if method == "mmt" else "absent")


def test_the_first_trial_is_the_default_config_where_the_space_holds_it(tmp_path):
    """Optuna's first trial (Tune's points_to_evaluate) is the base config's value of each searched parameter: the
    method's defaults after `fixed:` and --set; none where a default lies outside its range, or with
    --no-default-trial."""
    from reid_ray.cli.tune import build_parser, prepare_sweep
    from reid_ray.distributed.sweep import _tune_config, default_point

    a = build_parser().parse_args(["--method", "mmt", "--output", str(tmp_path), "--set", "optim.lr=2e-4"])
    sweep = prepare_sweep(a)
    space = load_search_space(sweep.space_path, sweep.base)
    point = default_point(sweep.base, space)
    assert point == {"params.num_clusters": 100, "params.alpha": 0.99, "params.soft_ce_weight": 0.5,
                     "params.soft_tri_weight": 0.8, "optim.lr": 2e-4}
    plan = plan_resources({"CPU": 2}, 1, 0, True)
    assert _tune_config(sweep, sweep.base, plan, point).search_alg._points_to_evaluate == [point]
    assert _tune_config(sweep, sweep.base, plan, None).search_alg._points_to_evaluate == []
    sweep.base.params.alpha = 0.9  # below the space's 0.95
    assert default_point(sweep.base, space) is None
    choice = load_search_space(write(tmp_path, "params:\n  params.cluster_algorithm: {distribution: choice, values: "
                                                "[kmeans, dbscan]}\n"), sweep.base)
    assert default_point(sweep.base, choice) == {"params.cluster_algorithm": "kmeans"}
    assert prepare_sweep(build_parser().parse_args(["--method", "mmt", "--output", str(tmp_path),
                                                    "--no-default-trial"])).default_first is False


@pytest.mark.parametrize("metric", ["target_mAP_last", "target_sharpness_last"])
def test_the_final_table_shows_adabn_beside_direct_transfer_and_the_other_score_beside_the_ranked_one(
        metric, tmp_path, monkeypatch, capsys):
    """The sweep's last table on a labelled target (the demo's): the direct-transfer and AdaBN rows above the
    trials; ranked on target mAP, the label-free sharpness beside it; ranked on the sharpness, target mAP beside it and
    the title says what it ranks on. summary.md's table says the same."""
    from reid_ray.config.sweep import Sweep
    from reid_ray.tracking.report import SweepOutcome, TrialRow, markdown_table, print_results

    monkeypatch.setenv("COLUMNS", "160")
    base = resolve_config("mmt")
    sweep = Sweep(name="demo", method="mmt", base=base, space_path="", space_text="", num_samples=1, metric=metric,
                  direct_transfer={"target_mAP": 19.2, "target_R1": 26.8, "target_sharpness": 61.0},
                  adabn={"target_mAP": 41.7, "target_R1": 53.6, "target_sharpness": 70.5})
    row = TrialRow("72681987", {"params.alpha": 0.999}, "completed", 3, 47.1, 57.3, 80.0, score=47.1 if
                   metric.startswith("target_mAP") else 88.2, label_free=88.2)
    print_results(SweepOutcome(sweep, [row], tmp_path, "sqlite:///m.db", params=["params.alpha"]))
    lines = capsys.readouterr().out.splitlines()
    cells = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in lines if len(re.split("[│┃]", line)) > 4]
    table = {row[0]: row[1:] for row in cells}  # the header (┃) and the rows (│), by their first cell
    head = table["trial"]
    if metric == "target_mAP_last":
        assert head[:3] == ["target mAP", "R1", "sharp"]
        assert table["direct transfer"][:3] == ["19.2", "26.8", "61.0"] and table["AdaBN"][:3] == ["41.7", "53.6", "70.5"]
        assert table["72681987"][:3] == ["47.1", "57.3", "88.2"]
    else:
        assert any("ranked on target_sharpness" in line for line in lines)
        assert head[:3] == ["target_sharpness ▼", "target mAP", "R1"]
        assert table["AdaBN"][:3] == ["70.5", "41.7", "53.6"] and table["72681987"][:3] == ["88.2", "47.1", "57.3"]
        md = markdown_table([row], ["params.alpha"], metric=metric, labelled=True)
        assert md.splitlines()[0] == ("| trial | params.alpha | target_sharpness (ranked on) | target mAP | target R1 | "
                                      "epochs | status |")
