import pytest

from reid_ray import ReidRayError
from reid_ray.config import (
    SYNTHETIC_DEFAULTS,
    TrainConfig,
    apply_overrides,
    flatten,
    from_dict,
    resolve_config,
    to_dict,
)
from reid_ray.training.optim import warmup_step_scheduler


def test_overrides_by_dotted_path_and_unique_leaf():
    cfg = apply_overrides(TrainConfig(), ["model.arch=resnet18", "lr=1e-4", "milestones=5,8", "in_memory=true"])
    assert cfg.model.arch == "resnet18" and cfg.optim.lr == 1e-4
    assert cfg.optim.milestones == (5, 8) and cfg.loader.in_memory is True


def test_unknown_and_badly_typed_keys_are_clear():
    with pytest.raises(ReidRayError, match="valid keys: .*optim.lr"):
        apply_overrides(TrainConfig(), ["learning_rate=1"])
    with pytest.raises(ReidRayError, match="expected float"):
        apply_overrides(TrainConfig(), ["lr=fast"])
    with pytest.raises(ReidRayError, match="key=value"):
        apply_overrides(TrainConfig(), ["lr"])


def test_build_config_layers_synthetic_defaults_method_params_and_flags():
    cfg = resolve_config("baseline", sets=["margin=0.5", "epochs=3"])
    assert cfg.model.arch == SYNTHETIC_DEFAULTS["model.arch"] and cfg.epochs == 3
    assert cfg.params.margin == 0.5 and cfg.params.epsilon == 0.1
    real = resolve_config("baseline", "market1501", "dukemtmc")
    assert real.model.arch == "resnet50" and real.epochs == 120  # paper defaults off the demo
    with pytest.raises(ReidRayError, match="valid: baseline"):
        resolve_config("nope")
    with pytest.raises(ReidRayError, match="valid names"):
        resolve_config("baseline", source="market")


def test_round_trip_and_flat_names():
    cfg = resolve_config("baseline")
    assert from_dict(to_dict(cfg)) == cfg
    assert "params.margin" in flatten(cfg) and "optim.lr" in flatten(cfg)


def test_bot_warmup_then_step_schedule():
    import torch
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_step_scheduler(opt, warmup_epochs=10, warmup_factor=0.1, milestones=(40, 70), gamma=0.1)
    lrs = []
    for _ in range(80):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55) and lrs[10] == 1.0
    assert lrs[39] == 1.0 and lrs[40] == pytest.approx(0.1) and lrs[70] == pytest.approx(0.01)


def test_clustering_section_keeps_its_old_one_word_form(tmp_path):
    """`clustering` was one word (actor | local) before it had a backend: `--clustering local`, old
    config.yaml / best_config.yaml files and old checkpoints' configs still mean `clustering.where`."""
    from reid_ray.clustering.client import run_spec
    from reid_ray.config import load_config_file
    from reid_ray.methods import METHODS

    cfg = resolve_config("mmt", flags={"clustering": "local"}, sets=["clustering.backend=torch"])
    assert (cfg.clustering.where, cfg.clustering.backend) == ("local", "torch")
    assert flatten(cfg)["clustering.backend"] == "torch" and "clustering" not in flatten(cfg)
    assert resolve_config("mmt", sets=["backend=faiss"]).clustering.backend == "faiss"  # the unique leaf
    old = tmp_path / "best_config.yaml"
    old.write_text("method: mmt\nclustering: local\nepochs: 3\n")
    method, _, _, file = load_config_file(old)
    assert resolve_config(method, file=file).clustering.where == "local"
    d = to_dict(resolve_config("mmt"))
    assert from_dict({**d, "clustering": "local"}).clustering.where == "local"  # an old checkpoint's config
    assert from_dict(d) == resolve_config("mmt")
    # the run's backend reaches the method's spec through shared code
    assert run_spec(METHODS["mmt"], cfg).backend == "torch" and METHODS["mmt"].cluster_spec(cfg).backend == "auto"
    with pytest.raises(ReidRayError, match=r"^clustering.backend='gpu'; valid: auto, faiss, torch$"):
        resolve_config("mmt", sets=["clustering.backend=gpu"])
    with pytest.raises(ReidRayError, match=r"^clustering.where='elsewhere'; valid: actor, local$"):
        resolve_config("mmt", file={"clustering": "elsewhere"})


class _RayWouldStart(Exception):
    """Raised where the run would start Ray: everything checked by then is what the pre-flight checks did."""


@pytest.fixture
def counted_checks(monkeypatch):
    from collections import Counter

    from reid_ray.config import checks

    monkeypatch.setattr(checks, "RUNS", Counter())
    monkeypatch.setattr(checks, "_passed", set())

    def stop():
        raise _RayWouldStart

    import reid_ray.distributed.driver as driver
    import reid_ray.distributed.sweep as sweep

    monkeypatch.setattr(driver, "init_ray", stop)
    monkeypatch.setattr(sweep, "init_ray", stop)
    return checks


def test_a_train_run_checks_each_thing_once_and_a_trial_checks_nothing(counted_checks, tiny_synth, tmp_path):
    """The CLI checks before it resolves anything, the driver asks again; each check runs once per process."""
    from reid_ray.cli.train import main
    from reid_ray.distributed.driver import run_training
    from reid_ray.distributed.resources import ResourcePlan

    with pytest.raises(_RayWouldStart):
        main(["--method", "mmt", "--data-root", str(tiny_synth), "--output", str(tmp_path / "out"),
              "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", "--set", "num_identities=4", "--set", "num_clusters=8"])
    runs = counted_checks.RUNS
    assert {name for name, _ in runs} == {"check_ranges", "check_paths", "check_source_models", "check_cuda_graph",
                                          "check_method"}
    assert set(runs.values()) == {1}, runs
    # a Tune trial receives its sweep's validated plan: nothing is checked again in its process
    runs.clear()
    cfg = resolve_config("mmt", flags=dict(data_root=str(tiny_synth), output=str(tmp_path / "out2")),
                         sets=["num_clusters=8", "epochs=0"])  # a config check_ranges would refuse
    with pytest.raises(_RayWouldStart):
        run_training(cfg, plan=ResourcePlan(use_gpu=False, concurrent=1, worker={"CPU": 1}, threads=1))
    assert not runs


def test_a_sweep_checks_its_base_and_each_range_end_once(counted_checks, tiny_synth, tmp_path):
    from reid_ray.cli.tune import build_parser, prepare_sweep
    from reid_ray.distributed.sweep import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  params.num_clusters: {distribution: int, low: 8, high: 16}\n"
                     "  optim.lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
                     "fixed:\n  loader.num_identities: 4\n  params.num_clusters: 10\n")
    sweep = prepare_sweep(build_parser().parse_args([
        "--method", "mmt", "--data-root", str(tiny_synth), "--search-space", str(space), "--num-samples", "2",
        "--output", str(tmp_path / "out"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]))
    with pytest.raises(_RayWouldStart):
        run_sweep(sweep)
    runs = counted_checks.RUNS
    assert set(runs.values()) == {1}, runs
    method_checks = [key for key in runs if key[0] == "check_method"]
    assert len(method_checks) == 1 + 2 * 2  # the base, and both ends of each of the two ranges
    assert sum(name == "check_paths" for name, _ in runs) == 1
