"""The Ray-free training path: a method, one epoch, evaluation."""

import torch

from reid_ray.config import resolve_config
from reid_ray.data.readers import read_dataset
from reid_ray.engine import evaluate_model, train_epoch
from reid_ray.methods import METHODS, Domains, EpochContext


def test_baseline_epoch_reports_named_losses_and_learns(tiny_synth):
    cfg = resolve_config("baseline", sets=["num_identities=4", "warmup_epochs=0", "erasing_prob=0"],
                         flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["baseline"](cfg, domains, torch.device("cpu"))
    method.setup()
    ctx = EpochContext(0)
    first = train_epoch(method, ctx)
    assert {"loss", "ce", "triplet", "acc", "lr", "images_per_s", "epoch_time"} <= set(first)
    assert first["loss"] == first["ce"] + first["triplet"] or abs(first["loss"] - first["ce"] - first["triplet"]) < 1e-4
    for e in range(1, 6):
        ctx.epoch = e
        last = train_epoch(method, ctx)
    assert last["loss"] < first["loss"]
    res = evaluate_model(method.eval_model(), domains.source, cfg, method.device)
    assert {"mAP", "R1", "R5", "R10", "cmc"} <= set(res) and 0 <= res["mAP"] <= 100
    # state round-trips into a fresh method
    fresh = METHODS["baseline"](cfg, domains, torch.device("cpu"))
    fresh.setup()
    fresh.load_state_dict(method.state_dict())
    x = torch.randn(2, 3, 64, 32)
    assert torch.allclose(fresh.eval_model().eval()(x), method.eval_model().eval()(x))
