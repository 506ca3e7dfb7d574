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
