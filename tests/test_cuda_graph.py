"""`model.cuda_graph` (training/graphs.py): what a captured step needs, checked on a CPU.

The capture itself needs a CUDA GPU (bench/device/run.sh runs it there). Everything it relies on is checked
here, with the CPU stand-in of a replay (`StepGraph(capture=False)`: the body run on the static buffers): the
same parameters, optimiser state, mean nets, losses and counts as the uncaptured device-side path, across
epochs whose lr changes and refreshes that reset the optimiser and change the number of clusters."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from reid_ray import ReidRayError
from reid_ray.clustering.client import ClusterSpec, LocalClusterer
from reid_ray.config import resolve_config
from reid_ray.config.checks import check_cuda_graph
from reid_ray.data.readers import read_dataset
from reid_ray.methods import METHODS, Domains, EpochContext
from reid_ray.models.mean_net import ema_update
from reid_ray.training.graphs import CapturedStep, plain_lr, prepare_optimizer
from reid_ray.training.loop import StepGraph, train_epoch
from reid_ray.training.optim import reset_optimizer_state


def _method(name, tiny_synth, *sets, clusterer=None, device_lr=False):
    cfg = resolve_config(name, sets=["num_identities=4", "optim.fused=true", *sets],
                         flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS[name](cfg, domains, torch.device("cpu"))
    if clusterer is not None:
        method.clusterer = clusterer(domains)
    method.setup()
    if device_lr:  # the reference of a captured run: the same optimiser (its lr a float32 tensor), uncaptured
        prepare_optimizer(method.optimizer, method.device, capture=False)
    return method


def _same_state(a, b):
    """Parameters, buffers, optimiser state (and mean nets) of two methods, to the bit."""
    for (name, x), y in zip(a.state_dict()["models"].items(), b.state_dict()["models"].values()):
        for k, v in x.items():
            assert torch.equal(v, y[k]), (name, k)
    for sa, sb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        for k, v in sa.items():
            assert torch.equal(v, sb[k]), k
    for e_a, e_b in zip(getattr(a, "emas", []), getattr(b, "emas", [])):
        for (k, v), w in zip(e_a.state_dict().items(), e_b.state_dict().values()):
            assert torch.equal(v, w), k


def test_the_captured_baseline_trains_as_the_device_path_across_an_lr_change(tiny_synth):
    """Two epochs of warmup (the lr changes between them: the captured step reads it from the group's device
    tensor, which the scheduler fills in place), one capture, the same state, losses and counts."""
    sets = ("optim.warmup_epochs=2", "erasing_prob=0")
    plain, graphed = _method("baseline", tiny_synth, *sets, device_lr=True), _method("baseline", tiny_synth, *sets)
    graphed.step_graph = StepGraph(graphed, capture=False, warmup=1)
    assert all(isinstance(g["lr"], torch.Tensor) for g in graphed.optimizer.param_groups)
    ctx_p, ctx_g = EpochContext(0), EpochContext(0)
    for epoch in range(2):
        ctx_p.epoch = ctx_g.epoch = epoch
        a, b = train_epoch(plain, ctx_p), train_epoch(graphed, ctx_g)
        assert a["lr"] == b["lr"] and a["iters"] == b["iters"] >= 3  # a warm-up step, the capture, replays
        for k in ("loss", "ce", "triplet", "acc", "skipped_steps"):
            assert a[k] == b[k], k
    assert b["graph_captures"] == 1 and ctx_g.iteration == ctx_p.iteration and ctx_g.iteration_t is None
    assert a["lr"] == pytest.approx(1.925e-4) and b["lr"] < float(graphed.optimizer.param_groups[0]["lr"])  # warmup
    _same_state(plain, graphed)


def test_a_nan_step_inside_the_captured_step_is_skipped_and_counted(tiny_synth):
    """The device-side skip inside the captured body: a NaN step leaves parameters and moments as they were and
    is counted, as in the uncaptured path (step 1 is a warm-up step, 2 the captured one, 5 a replayed one)."""
    methods = []
    for graph in (False, True):
        method = _method("baseline", tiny_synth, "warmup_epochs=0", "num_identities=2", device_lr=not graph)
        if graph:
            method.step_graph = StepGraph(method, capture=False, warmup=2)
        step = method.train_step

        def faulty(batch, ctx, step=step):
            losses = step(batch, ctx)
            if ctx.iteration in (1, 2, 5):
                losses["loss"] = losses["loss"] * float("nan")
            return losses
        method.train_step = faulty
        out = train_epoch(method, EpochContext(0))
        assert out["skipped_steps"] == 3, out
        methods.append((method, out))
    (plain, a), (graphed, b) = methods
    assert a["iters"] == b["iters"] >= 5 and a["loss"] == b["loss"]
    _same_state(plain, graphed)


def _varying_k(ks):
    """A clusterer whose refreshes find k = ks[0], ks[1], ... clusters (k-means: DBSCAN's changing count)."""
    class Varying(LocalClusterer):
        def __init__(self, domains):
            super().__init__(ClusterSpec(num_clusters=ks[0]), domains.target.train["pid"].to_numpy())
            self.calls = 0

        def refresh(self, local_features, epoch):
            self.spec = ClusterSpec(num_clusters=ks[min(self.calls, len(ks) - 1)])
            self.calls += 1
            return super().refresh(local_features, epoch)
    return Varying


def test_captured_mmt_matches_across_refreshes_and_recaptures_when_k_changes(tiny_synth):
    """MMT: the mean nets' weight from the device step counter, the optimiser reset in place at each refresh,
    a new capture when a refresh changes the number of clusters (graph_key), not when it keeps it."""
    sets = ("num_clusters=10", "iters=6", "erasing_prob=0")
    ks = [10, 10, 8]
    plain = _method("mmt", tiny_synth, *sets, clusterer=_varying_k(ks), device_lr=True)
    graphed = _method("mmt", tiny_synth, *sets, clusterer=_varying_k(ks))
    graphed.step_graph = StepGraph(graphed, capture=False, warmup=1)
    ctx_p, ctx_g = EpochContext(0), EpochContext(0)
    captures = []
    for epoch in range(3):
        ctx_p.epoch = ctx_g.epoch = epoch
        a, b = train_epoch(plain, ctx_p), train_epoch(graphed, ctx_g)
        captures.append(b["graph_captures"])
        assert graphed.k == ks[epoch] and a["iters"] == b["iters"] == 6
        assert a["loss"] == b["loss"] and a["soft_triplet"] == b["soft_triplet"]
    assert captures == [1, 1, 2]
    _same_state(plain, graphed)


def test_the_mean_nets_weight_from_a_device_step_is_the_hosts_to_the_bit():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 4)
    for step in (0, 1, 7, 5000):
        for ok in (None, torch.tensor(1.0), torch.tensor(0.0)):
            host, dev = torch.nn.Linear(5, 4), None
            dev = copy.deepcopy(host)
            ema_update(host, net, 0.999, step, ok if ok is not None else torch.tensor(1.0))
            ema_update(dev, net, 0.999, torch.tensor(step), ok)
            for x, y in zip(host.parameters(), dev.parameters()):
                assert torch.equal(x, y), (step, ok)


@pytest.mark.parametrize("kind", ["adam", "adam-fused", "sgd", "sgd-fused"])
def test_an_optimiser_reset_in_place_trains_as_a_cleared_one(kind):
    """MMT's refresh resets the moments in place (a captured step reads them at their addresses); the steps
    after it equal those after `optimizer.state.clear()` (a fresh optimiser's), the tensors stay where they were."""
    def run(reset):
        torch.manual_seed(0)
        net = torch.nn.Linear(6, 3)
        name, fused = kind.split("-")[0], kind.endswith("fused")
        opt = (torch.optim.Adam(net.parameters(), lr=1e-2, fused=fused) if name == "adam" else
               torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9, fused=fused))
        x = torch.randn(8, 6)
        for i in range(6):
            if i == 3:
                addresses = [v.data_ptr() for s in opt.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor)]
                reset(opt)
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
        return net, addresses, opt
    cleared, _, _ = run(lambda o: o.state.clear())
    in_place, before, opt = run(reset_optimizer_state)
    assert [v.data_ptr() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)] == before
    for a, b in zip(cleared.parameters(), in_place.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_captured_step_warms_up_captures_and_replays_on_static_buffers():
    """The stand-in's bookkeeping: `warmup` eager calls on the batches themselves, then one capture, replays on the
    static buffers (each batch copied in), a new warm-up and capture when the key or a shape changes."""
    seen = []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    step = CapturedStep(lambda b: seen.append((b["x"].clone(), b["x"].data_ptr())), opt, capture=False, warmup=2)
    batches = [{"x": torch.full((2,), float(i))} for i in range(5)]
    for b in batches:
        step(b, key=1)
    assert [float(x[0]) for x, _ in seen] == [0, 1, 2, 3, 4] and step.captures == 1
    assert seen[0][1] == batches[0]["x"].data_ptr() and seen[2][1] == seen[3][1] == seen[4][1] != batches[2]["x"].data_ptr()
    step({"x": torch.zeros(2)}, key=2)  # another key: a warm-up step again
    assert seen[-1][1] != seen[4][1] and step.captures == 1 and step.left == 1
    step({"x": torch.zeros(3)}, key=2)  # another shape: the warm-up starts over
    assert step.left == 1


def test_the_lr_as_a_device_tensor_and_back():
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.1 * (e + 1))
    prepare_optimizer(opt, torch.device("cpu"), capture=False)
    lr = opt.param_groups[0]["lr"]
    opt.step()  # no gradients: nothing moves (the scheduler expects a step before its own)
    sched.step()  # the scheduler fills the tensor in place: a captured step reads the new value
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(6e-5)
    plain_lr(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5) and not isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    with pytest.raises(ReidRayError, match="fused optimiser kernel"):
        prepare_optimizer(torch.optim.Adam(net.parameters(), lr=1e-3), torch.device("cpu"), capture=False)


def test_a_checkpoint_of_a_captured_run_resumes_uncaptured(tiny_synth):
    graphed = _method("baseline", tiny_synth, "warmup_epochs=0")
    graphed.step_graph = StepGraph(graphed, capture=False, warmup=1)
    train_epoch(graphed, EpochContext(0))
    state = graphed.state_dict()
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], torch.Tensor)
    plain = _method("baseline", tiny_synth, "warmup_epochs=0")
    plain.load_state_dict(state)
    assert isinstance(plain.optimizer.param_groups[0]["lr"], float)
    out = train_epoch(plain, EpochContext(1))  # the fused kernel with a float lr again
    assert np.isfinite(out["loss"])


@pytest.mark.parametrize("sets, message", [
    (["method=ecn"], "ecn's step cannot be captured"),
    (["workers=2"], "pass --workers 1"),
    (["workers=1", "model.compile=true"], "pick one"),
    (["workers=1", "optim.fused=false"], "fused optimiser kernel"),
    (["workers=1", "use_gpu=false"], "use_gpu=false"),
])
def test_a_step_that_cannot_be_captured_is_refused_before_ray(sets, message):
    method = next((s.split("=")[1] for s in sets if s.startswith("method=")), "baseline")
    cfg = resolve_config(method, sets=["model.cuda_graph=true", *(s for s in sets if not s.startswith("method="))])
    with pytest.raises(ReidRayError, match=message):
        check_cuda_graph(cfg)
    check_cuda_graph(resolve_config("mmt", sets=["model.cuda_graph=true", "workers=1"]))  # MMT can


def test_a_captured_step_on_a_cpu_worker_is_a_clear_error(tiny_synth):
    method = _method("baseline", tiny_synth, "model.cuda_graph=true", "workers=1")
    with pytest.raises(ReidRayError, match="captures the training step on a CUDA GPU; this worker runs on cpu"):
        train_epoch(method, EpochContext(0))
