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


def test_gpu_layout_comes_before_ddp_and_compile_keeps_plain_networks(tiny_synth):
    """On a GPU the networks are channels_last before DDP wraps them (it buckets gradients in their layout), the
    mean nets too; `model.compile` compiles in place, so checkpoints hold the plain networks' keys with one
    worker (no DDP wrapper) as with several, and a plain checkpoint loads after compiling."""
    from reid_ray.engine import finish_networks, gpu_layout

    cfg = resolve_config("mmt", sets=["num_identities=4", "num_clusters=6"], flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device's type is read: nothing moves to it

    def channels_last(m):
        return all(p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() == 4)

    class DDP(torch.nn.Module):  # as torch's: the network is its .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    seen = []

    def prepare_model(m):
        seen.append(channels_last(m))
        return DDP(m)

    method = METHODS["mmt"](cfg, domains, cpu)
    method.setup(wrap=gpu_layout(prepare_model, cuda))
    assert seen == [True, True]
    finish_networks(method, cuda, compile_=True)
    assert all(channels_last(m) for m in method.eval_models().values())  # the mean nets
    state = method.state_dict()
    plain = list(state["models"]["net1"])
    assert plain and not any("_orig_mod" in k for k in plain)

    single = METHODS["mmt"](cfg, domains, cpu)  # one worker: prepare_model leaves the network unwrapped
    single.setup()
    finish_networks(single, cpu, compile_=True)
    assert list(single.state_dict()["models"]["net1"]) == plain
    single.load_state_dict(state)  # --resume of a plain checkpoint after compiling
    assert torch.equal(single.models["net1"].classifier.weight, method.models["net1"].module.classifier.weight)
    assert gpu_layout(prepare_model, cpu) is prepare_model and not channels_last(single.models["net1"])
