"""The Ray-free training path: a method, one epoch, evaluation."""

import pytest
import torch

from reid_ray.config import resolve_config
from reid_ray.data.readers import read_dataset
from reid_ray.methods import METHODS, Domains, EpochContext
from reid_ray.training.loop import evaluate_model, train_epoch


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
    from reid_ray.training.loop import finish_networks, gpu_layout

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


def _baseline(tiny_synth, *sets):
    cfg = resolve_config("baseline", sets=["num_identities=4", "warmup_epochs=0", *sets],
                         flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["baseline"](cfg, domains, torch.device("cpu"))
    method.setup()
    return method


def _nan_at(method, steps):
    """The method's loss is NaN at these global steps (0-based)."""
    step = method.train_step

    def faulty(batch, ctx):
        losses = step(batch, ctx)
        if ctx.iteration in steps:
            losses["loss"] = losses["loss"] * float("nan")
        return losses
    method.train_step = faulty


def test_the_optimiser_is_fused_on_a_gpu_and_a_checkpoint_keeps_this_runs_kernel(tiny_synth):
    assert not _baseline(tiny_synth).optimizer.param_groups[0].get("fused")  # auto on a CPU: torch's default
    fused = _baseline(tiny_synth, "optim.fused=true")
    assert fused.optimizer.param_groups[0]["fused"]
    plain = _baseline(tiny_synth, "optim.fused=false")
    fused.load_state_dict(plain.state_dict())  # a checkpoint of a CPU run, resumed where the kernel is fused
    assert all(g["fused"] for g in fused.optimizer.param_groups)
    plain.load_state_dict(fused.state_dict())
    assert not any(g["fused"] for g in plain.optimizer.param_groups)


@pytest.mark.parametrize("device_skip", [True, False])
def test_a_nan_step_skipped_on_the_device_leaves_what_the_host_path_leaves(tiny_synth, monkeypatch, device_skip):
    """With a fused optimiser the NaN check stays on the device (the step runs, the fused kernel skips it
    through found_inf, the counters are read once an epoch): the same parameters, Adam state, losses and
    counts as the host path, which runs no backward for such a step."""
    from reid_ray.methods.baseline import Baseline

    def run(on_device):
        monkeypatch.setattr(Baseline, "device_skip", on_device)
        method = _baseline(tiny_synth, "optim.fused=true")
        _nan_at(method, {1, 2})
        ctx = EpochContext(0)
        out = train_epoch(method, ctx)
        return method, ctx, out

    host_method, host_ctx, host = run(False)
    method, ctx, out = run(device_skip)
    assert out["skipped_steps"] == host["skipped_steps"] == 2 and out["iters"] == host["iters"] == ctx.iteration - 2
    assert ctx.nonfinite_in_a_row == host_ctx.nonfinite_in_a_row == 0 and ctx.step_ok is None
    assert out["loss"] == pytest.approx(host["loss"], rel=1e-6) and out["images_per_s"] > 0
    for k, v in host_method.eval_model().state_dict().items():
        assert torch.equal(v, method.eval_model().state_dict()[k]), k
    steps = {float(s["step"]) for s in method.optimizer.state.values()}
    assert steps == {float(s["step"]) for s in host_method.optimizer.state.values()} == {out["iters"]}


def test_a_run_diverges_on_the_device_with_the_host_paths_message(tiny_synth, monkeypatch):
    from reid_ray import Diverged
    from reid_ray.methods.baseline import Baseline

    messages = []
    for on_device in (False, True):
        monkeypatch.setattr(Baseline, "device_skip", on_device)
        method = _baseline(tiny_synth, "optim.fused=true", "max_nonfinite_steps=2")
        _nan_at(method, set(range(1, 1000)))
        with pytest.raises(Diverged, match="2 non-finite losses in a row") as e:
            train_epoch(method, EpochContext(0))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "step 3" in messages[0]
