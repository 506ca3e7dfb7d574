"""Real-dataset presets: valid datasets, valid config keys, the papers' settings, clear errors."""

import pytest

from reid_ray import ReidRayError
from reid_ray.config import TrainConfig, flatten, resolve_config
from reid_ray.config.presets import apply_preset, preset_names, resolve_preset
from reid_ray.data.readers import dataset_names
from reid_ray.methods import METHODS

PRESETS = {name: resolve_preset(name) for name in preset_names()}
UDA = {name: p for name, p in PRESETS.items() if p["source"] != "none"}  # market, msmt17: no source (test_unsupervised)

CONFIG_KEYS = set(flatten(TrainConfig()))


def same(a, b) -> bool:
    return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) else a == b


def test_names():
    assert set(UDA) == {"market2duke", "duke2market", "market2msmt", "msmt2market"}
    assert set(PRESETS) - set(UDA) == {"market", "msmt17"}


@pytest.mark.parametrize("name", sorted(UDA))
@pytest.mark.parametrize("method", sorted(METHODS))  # baseline, mmt, and ecn/mar once registered
def test_preset_builds_a_config(name, method):
    source, target, overrides = apply_preset(name, method)
    assert source in dataset_names() and target in dataset_names()
    cfg = resolve_config(method, source, target, preset=name)
    flat = flatten(cfg)
    for key, value in overrides.items():
        assert same(flat[key], value), key
    assert (cfg.model.arch, cfg.transform.height, cfg.transform.width) == ("resnet50", 256, 128)
    # P × K = 16 × 4, or the paper's batch (ECN 128, MAR 184 → 192, Cluster Contrast 256 = 16 × 16)
    expected = {"ecn": (32, 4), "mar": (48, 4), "cluster_contrast": (16, 16)}.get(method, (16, 4))
    assert (cfg.loader.num_identities, cfg.loader.num_instances) == expected
    params = {k.split(".", 1)[1] for k in overrides if k.startswith("params.")}
    unknown = params - set(flatten(METHODS[method].Params()))
    assert not unknown, f"not {method} params: {unknown}"


def test_method_overrides_are_well_formed():
    for name, p in PRESETS.items():
        assert set(p) == {"source", "target", "overrides", "method_overrides", "published"}
        assert set(p["overrides"]) <= CONFIG_KEYS, name
        for method, keys in p["method_overrides"].items():
            for key in keys:
                assert isinstance(key, str) and (key.startswith("params.") or key in CONFIG_KEYS), (name, method, key)
            if method in METHODS:  # methods still being written (ecn) are checked once they exist
                params = {k.split(".", 1)[1] for k in keys if k.startswith("params.")}
                assert params <= set(flatten(METHODS[method].Params())), (name, method, params)
        for method, pub in p["published"].items():
            assert method in p["method_overrides"] and set(pub) == {"mAP", "R1", "paper"}


def test_the_papers_cluster_numbers():
    k = {n: apply_preset(n, "mmt")[2]["params.num_clusters"] for n in UDA}
    assert k == {"duke2market": 500, "market2duke": 700, "market2msmt": 1500, "msmt2market": 500}
    ecn = apply_preset("duke2market", "ecn")[2]
    assert (ecn["params.beta"], ecn["params.lam"], ecn["params.knn_k"]) == (0.05, 0.3, 6)
    assert PRESETS["duke2market"]["published"]["mmt"]["mAP"] == 71.2


def test_long_names_and_baseline_gets_shared_settings_and_bots_center_loss():
    assert resolve_preset("dukemtmc2market1501")["target"] == "market1501"
    assert resolve_preset("Market1501->DukeMTMC")["target"] == "dukemtmc"
    assert resolve_preset("market1501")["source"] == "none"
    assert apply_preset("duke2market", "baseline")[2] == {**PRESETS["duke2market"]["overrides"],
                                                          "params.center_loss_weight": 0.0005}
    resolve_preset("duke2market")["overrides"]["model.arch"] = "x"  # a copy: PRESETS stays intact
    assert PRESETS["duke2market"]["overrides"]["model.arch"] == "resnet50"


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ReidRayError, match="duke2market.*market2duke"):
        resolve_preset("duke2cuhk")


def test_papers_recipes_are_the_methods_real_data_defaults():
    from reid_ray.config import resolve_config

    ecn = resolve_config("ecn", preset="duke2market")
    assert (ecn.optim.optimizer, ecn.optim.lr, ecn.optim.base_lr_mult, ecn.optim.milestones, ecn.epochs) == \
        ("sgd", 0.1, 0.1, (40,), 60)
    assert not ecn.params.source_init and ecn.model.pretrained == "imagenet"
    mar = resolve_config("mar", preset="msmt2market")
    assert mar.source == "msmt17-all" and mar.target == "market1501"  # the paper's 4,101 agents
    assert (mar.optim.optimizer, mar.optim.lr, mar.optim.weight_decay, mar.optim.bn_weight_decay) == \
        ("sgd", 2e-4, 2.5e-2, False)
    assert (mar.epochs, mar.optim.milestones, mar.params.target_batch) == (20, (12, 17), 184)
    assert resolve_config("mar", preset="market2duke").source == "market1501"
    san = resolve_config("san", preset="market2duke")
    assert san.params.texture_step and (san.params.texture_lr, san.params.texture_beta1) == (1e-5, 0.5)
    for method in ("baseline", "mmt", "ecn", "mar", "spcl", "san", "cluster_contrast"):
        assert resolve_config(method, preset="duke2market").model.pretrained == "imagenet", method


def test_parameter_groups_base_lr_and_no_weight_decay_on_batchnorm():
    import torch

    from reid_ray.config import OptimConfig
    from reid_ray.models.reid_net import ModelConfig, build_reid_net
    from reid_ray.training.optim import build_optimizer, param_groups

    net = build_reid_net(ModelConfig(arch="small", sync_bn=False), 5)
    assert len(param_groups([net], OptimConfig())) == 1  # the default: one group, a plain parameter list's layout
    groups = param_groups([net], OptimConfig(lr=0.1, base_lr_mult=0.1, bn_weight_decay=False, weight_decay=5e-4))
    by_id = {id(q): (g["lr"], g["weight_decay"]) for g in groups for q in g["params"]}
    assert by_id[id(net.classifier.weight)] == (0.1, 5e-4)           # a new layer
    assert by_id[id(net.bnneck.weight)] == (0.1, 0.0)                # new, BatchNorm
    conv = next(q for n, q in net.backbone.named_parameters() if q.dim() == 4)
    bn = next(m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert by_id[id(conv)] == (0.1 * 0.1, 5e-4) and by_id[id(bn.weight)] == (0.1 * 0.1, 0.0)
    assert id(net.bnneck.bias) not in by_id                           # frozen: not trained
    assert groups[0]["lr"] == 0.1                                     # the logged lr: the new layers'
    opt = build_optimizer(groups, OptimConfig(optimizer="sgd"))
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == len(groups)


def test_mars_embedded_schedule_is_the_papers_halved():
    """MAR on the embedded benchmark: 10 epochs, no warmup, lr ×0.1 for the last 2 (the paper: 20 epochs, ×0.1 at
    12 and 17): epoch e (0-based) trains at Adam's 3.5e-4 up to e = 7, at 3.5e-5 from e = 8."""
    import torch

    from reid_ray.training.optim import warmup_step_scheduler

    mar = resolve_config("mar")
    assert (mar.epochs, mar.optim.milestones, mar.optim.warmup_epochs) == (10, (8,), 0)
    assert (mar.optim.optimizer, mar.optim.lr) == ("adam", 3.5e-4)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=mar.optim.lr)
    sched = warmup_step_scheduler(opt, mar.optim.warmup_epochs, mar.optim.warmup_factor, mar.optim.milestones,
                                  mar.optim.gamma)
    lrs = []
    for _ in range(mar.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([3.5e-4] * 8 + [3.5e-5] * 2)
