"""Real-dataset presets: valid datasets, valid config keys, the papers' settings, clear errors."""

import pytest

from reid_ray import ReidRayError
from reid_ray.config import TrainConfig, flatten, resolve_config
from reid_ray.data.readers import dataset_names
from reid_ray.methods import METHODS
from reid_ray.presets import apply_preset, preset_names, resolve_preset

PRESETS = {name: resolve_preset(name) for name in preset_names()}

CONFIG_KEYS = set(flatten(TrainConfig()))


def same(a, b) -> bool:
    return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) else a == b


def test_names():
    assert set(PRESETS) == {"market2duke", "duke2market", "market2msmt", "msmt2market"}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("method", sorted(METHODS))  # baseline, mmt, and ecn/mar once registered
def test_preset_builds_a_config(name, method):
    source, target, overrides = apply_preset(name, method)
    assert source in dataset_names() and target in dataset_names()
    cfg = resolve_config(method, source, target, preset=name)
    flat = flatten(cfg)
    for key, value in overrides.items():
        assert same(flat[key], value), key
    assert (cfg.model.arch, cfg.transform.height, cfg.transform.width) == ("resnet50", 256, 128)
    assert (cfg.loader.num_identities, cfg.loader.num_instances) == (16, 4)
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
    k = {n: apply_preset(n, "mmt")[2]["params.num_clusters"] for n in PRESETS}
    assert k == {"duke2market": 500, "market2duke": 700, "market2msmt": 1500, "msmt2market": 500}
    ecn = apply_preset("duke2market", "ecn")[2]
    assert (ecn["params.beta"], ecn["params.lam"], ecn["params.knn_k"]) == (0.05, 0.3, 6)
    assert PRESETS["duke2market"]["published"]["mmt"]["mAP"] == 71.2


def test_long_names_and_baseline_gets_shared_settings_only():
    assert resolve_preset("dukemtmc2market1501")["target"] == "market1501"
    assert resolve_preset("Market1501->DukeMTMC")["target"] == "dukemtmc"
    assert apply_preset("duke2market", "baseline")[2] == PRESETS["duke2market"]["overrides"]
    resolve_preset("duke2market")["overrides"]["model.arch"] = "x"  # a copy: PRESETS stays intact
    assert PRESETS["duke2market"]["overrides"]["model.arch"] == "resnet50"


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ReidRayError, match="duke2market.*market2duke"):
        resolve_preset("duke2cuhk")
