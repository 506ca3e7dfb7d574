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
from reid_ray.methods.base import warmup_step_scheduler


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
