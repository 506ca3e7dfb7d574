"""The Ray-free parts of a training run: one epoch of a method, and evaluation.

The Ray Train worker loop (`distributed/worker.py`) calls these; benchmarks and tests call
them directly in a bare torch process.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from reid_ray import Diverged, ReidRayError
from reid_ray.config import TrainConfig
from reid_ray.data.loader import build_test_loader, epoch_batches
from reid_ray.data.readers import ReIDDataset
from reid_ray.evaluation import evaluate_rank, extract_features, pairwise_distance
from reid_ray.methods.base import EpochContext, Method


def gpu_layout(wrap, device: torch.device):
    """`wrap` (Ray Train's `prepare_model`) applied to networks in channels_last on a GPU (the layout of the
    inputs, see `train_epoch`): DDP lays out its gradient buckets for the parameters' memory format when it
    wraps them, so the conversion must come first (after, every step copies the gradients into the buckets)."""
    if device.type != "cuda":
        return wrap
    return lambda m: wrap(m.to(memory_format=torch.channels_last))


def finish_networks(method: Method, device: torch.device, compile_: bool) -> None:
    """After `method.setup`: the networks the method keeps outside DDP (mean nets, evaluated networks) in
    the trained ones' layout on a GPU, and `model.compile` applied in place (`nn.Module.compile`): the modules
    keep their state_dict keys, so checkpoints, `best.pt`, `--init`, export and `--resume` read plain
    networks, with one worker (no DDP wrapper) as with many (`torch.compile(m)` would prefix `_orig_mod.`)."""
    if device.type == "cuda":
        # every training batch has one shape (P×K images of one size): cuDNN times its convolution algorithms
        # once per shape and keeps the fastest (they may differ in the last bits from run to run)
        torch.backends.cudnn.benchmark = True
        for m in method.eval_models().values():
            m.to(memory_format=torch.channels_last)
    if compile_:
        for m in method.models.values():
            m.compile()


def train_epoch(method: Method, ctx: EpochContext, amp: bool = False) -> dict[str, float]:
    """One epoch: `method.iterations()` steps (the loader restarted as often as needed), or one pass of the
    method's train loader when that is None; returns mean losses, lr, images/s, epoch time
    (of the training iterations) and `refresh_time` (what the method did when the epoch started).

    A step whose loss is NaN or inf on any rank is skipped on every rank (no parameter, optimiser or mean-net
    update) and counted; `max_nonfinite_steps` of them in a row stop the run (`Diverged`). Where the method
    allows it (`Method.device_skip`) and the optimiser is fused (`optim.fused`, the default on CUDA), the check
    stays on the device: the step always runs, the optimiser is told to skip through its `found_inf` tensor
    (what a GradScaler passes it), the mean nets get a zero weight (`ctx.step_ok`), and the counters are read
    once, at the end of the epoch, so the host never waits for the GPU between forward and backward. A run
    that diverges then stops at the end of that epoch (its remaining steps are skipped in the same way unless
    their losses are finite again). Elsewhere, the flag is read every step (a host synchronisation, which costs
    nothing on a CPU) and a non-finite step runs no backward at all."""
    t_start = time.perf_counter()
    method.on_epoch_start(ctx)
    refresh_time = time.perf_counter() - t_start
    device = method.device
    use_amp = amp and device.type == "cuda"
    dtype = amp_dtype(device) if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)  # bf16 needs no loss scaling
    on_device = (type(method).device_skip and not scaler.is_enabled()
                 and all(g.get("fused") for g in method.optimizer.param_groups))
    graph = step_graph(method, on_device, scaler.is_enabled())
    # a captured step runs autocast without its cache of cast weights (the cache lives outside the graph)
    autocast = (lambda: torch.autocast("cuda", dtype=dtype, cache_enabled=graph is None)) if use_amp else nullcontext
    sums: dict[str, torch.Tensor] = {}
    tally = None
    if graph is not None:
        tally = graph.begin_epoch(ctx, autocast)
    elif on_device:
        tally = _StepTally(device, ctx, method.cfg.max_nonfinite_steps)
    n_img, steps, skipped, t0 = 0, 0, 0, time.perf_counter()
    for batch in epoch_batches(method.train_loader, method.iterations()):
        if device.type == "cuda":
            to_device(batch, device)
        if graph is not None:
            graph.step(batch)
            ctx.iteration += 1
            continue
        if on_device:
            device_step(method, ctx, batch, autocast, tally)
            ctx.iteration += 1
            continue
        with autocast():
            losses = method.train_step(batch, ctx)
        if not finite_on_every_rank(losses["loss"], ctx.world_size):
            skipped += 1  # no backward, no step, no mean-net update: every rank skips this batch together
            ctx.nonfinite_in_a_row += 1
            ctx.iteration += 1
            limit = method.cfg.max_nonfinite_steps
            if ctx.nonfinite_in_a_row >= limit:
                raise Diverged(f"training diverged: {limit} non-finite losses in a row (epoch {ctx.epoch + 1}, "
                               f"step {ctx.iteration}); lower optim.lr, or raise max_nonfinite_steps")
            continue
        ctx.nonfinite_in_a_row = 0
        method.optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(method.optimizer)
        scaler.update()
        method.after_step(ctx)
        for k, v in losses.items():  # summed where they are: one host synchronisation an epoch, not one a loss a step
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_img += len(batch["img"])
        steps += 1
        ctx.iteration += 1
    if tally is not None:
        method.optimizer.found_inf = None
        ctx.step_ok = ctx.iteration_t = None
        steps, skipped, n_img, sums = tally.read()  # the epoch's one synchronisation
    seconds = time.perf_counter() - t0
    lr = float(method.optimizer.param_groups[0]["lr"])  # a device tensor under model.cuda_graph: read once an epoch
    method.scheduler.step()
    out = {k: float(v) / max(steps, 1) for k, v in sums.items()}
    # images/s over all workers (each rank sees its share of every batch)
    out.update({"lr": lr, "epoch_time": seconds, "images_per_s": n_img * ctx.world_size / max(seconds, 1e-9),
                "iters": steps, "skipped_steps": skipped, "refresh_time": refresh_time, **method.epoch_metrics()})
    if graph is not None:
        out["graph_captures"] = graph.captured.captures
    return out


def device_step(method: Method, ctx: EpochContext, batch: dict, autocast, tally: _StepTally) -> None:
    """One step of `train_epoch`'s device-side skip, with no host synchronisation: the losses, the finite flag
    (all-reduced), backward, the fused optimiser told to skip through `found_inf`, the method's own updates
    scaled by `ctx.step_ok`, and the epoch's sums and counters, all on the device. What a captured step
    (`model.cuda_graph`, `StepGraph`) records and replays."""
    with autocast():
        losses = method.train_step(batch, ctx)
    ok = finite_flag(losses["loss"], ctx.world_size)
    method.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    method.optimizer.found_inf = 1 - ok  # the fused kernel leaves every parameter and moment as it was
    method.optimizer.step()
    ctx.step_ok = ok
    method.after_step(ctx)
    tally.add(ok, len(batch["img"]), losses)  # a skipped step's NaN never reaches the sums


class StepGraph:
    """`model.cuda_graph`: the method's `device_step` captured in a CUDA graph (training/graphs.py), and what
    must outlive an epoch for it: the tally (sums and counters reset in place each epoch) and the device step
    counter behind `ctx.iteration_t`. Made by `step_graph` on the first epoch and kept as `method.step_graph`;
    a test makes one with `capture=False` on a CPU (the body replayed eagerly on the static buffers)."""

    def __init__(self, method: Method, capture: bool, warmup: int | None = None):
        from torch.nn.parallel import DistributedDataParallel

        from reid_ray.training.graphs import WARMUP_STEPS, WARMUP_STEPS_DDP, CapturedStep, prepare_optimizer

        self.method = method
        prepare_optimizer(method.optimizer, method.device, capture)
        self.iteration = torch.zeros((), dtype=torch.int64, device=method.device)
        self.tally = _StepTally(method.device, EpochContext(0), method.cfg.max_nonfinite_steps)
        self.ctx, self.autocast = EpochContext(0), nullcontext
        ddp = any(isinstance(m, DistributedDataParallel) for m in method.models.values())
        warmup = warmup if warmup is not None else WARMUP_STEPS_DDP if ddp else WARMUP_STEPS
        self.captured = CapturedStep(self._body, method.optimizer, capture, warmup)

    def begin_epoch(self, ctx: EpochContext, autocast) -> _StepTally:
        self.ctx, self.autocast = ctx, autocast
        ctx.iteration_t = self.iteration
        self.tally.reset(ctx)
        return self.tally

    def step(self, batch: dict) -> None:
        self.iteration.fill_(self.ctx.iteration)  # the step the mean nets' weight is computed from, on the device
        self.captured(batch, self.method.graph_key())

    def _body(self, batch: dict) -> None:
        device_step(self.method, self.ctx, batch, self.autocast, self.tally)


def step_graph(method: Method, on_device: bool, scaled: bool) -> StepGraph | None:
    """The method's `StepGraph` under `model.cuda_graph` (made on the first call), else None; a clear error
    where the step cannot be captured (checked before Ray starts where the config shows it: config.checks)."""
    graph = getattr(method, "step_graph", None)
    if graph is not None or not method.cfg.model.cuda_graph:
        return graph
    from reid_ray.training.graphs import check_capture_device

    check_capture_device(method.device)
    if scaled:
        raise ReidRayError("model.cuda_graph=true needs bf16 autocast (Ampere or later GPUs) or --set amp=false: "
                           "this GPU's float16 autocast scales the loss, which reads the host every step")
    if not on_device:
        raise ReidRayError(f"model.cuda_graph=true: {method.name} cannot skip a NaN step on the device (its state "
                           "changes outside the optimiser), so its step cannot be captured; drop the flag")
    method.step_graph = StepGraph(method, capture=True)
    return method.step_graph


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of the batch on `device` (copies that do not wait for the host), its images (`img`, a second
    view, a camera-style copy, the target's `t_img`...) channels_last, the layout of the networks on a GPU
    (`gpu_layout`)."""
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            batch[k] = v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and v.is_floating_point() else v
    return batch


class _StepTally:
    """An epoch's step counters and loss sums kept on the device (`train_epoch`'s device-side skip): finite
    steps, their images, skipped steps, the current run of non-finite steps (carried in from
    `ctx.nonfinite_in_a_row`), the first step at which that run reached the limit, and each loss summed over
    the finite steps. Updated in place (a captured step writes them where they are); `reset` starts another
    epoch in the same tensors; `read` is the one host synchronisation."""

    def __init__(self, device: torch.device, ctx: EpochContext, limit: int):
        self.limit = limit
        z = torch.zeros((), device=device, dtype=torch.int64)
        self.steps, self.images, self.skipped, self.step = z.clone(), z.clone(), z.clone(), z.clone()
        self.run, self.first_hit = z.clone(), z.clone()
        self.sums: dict[str, torch.Tensor] = {}
        self.reset(ctx)

    def reset(self, ctx: EpochContext) -> None:
        self.ctx, self.start = ctx, ctx.iteration
        for t in (self.steps, self.images, self.skipped, self.step, *self.sums.values()):
            t.zero_()
        self.run.fill_(ctx.nonfinite_in_a_row)
        self.first_hit.fill_(-1)

    def add(self, ok: torch.Tensor, images: int, losses: dict[str, torch.Tensor]) -> None:
        good = ok.to(torch.int64)
        self.steps += good
        self.images += good * images
        self.skipped += 1 - good
        self.run.mul_(1 - good).add_(1 - good)          # +1 on a non-finite step, back to 0 on a finite one
        self.step += 1
        hit = (self.run >= self.limit) & (self.first_hit < 0)
        self.first_hit.copy_(torch.where(hit, self.step, self.first_hit))
        for k, v in losses.items():
            if k not in self.sums:  # the first step's (eager: a captured step finds them made)
                self.sums[k] = torch.zeros((), dtype=torch.float32, device=self.steps.device)
            self.sums[k].add_(torch.where(ok > 0, v.detach().float(), 0.0))

    def read(self) -> tuple[int, int, int, dict[str, float]]:
        """(finite steps, skipped steps, images of the finite steps, loss sums); raises `Diverged` where the run
        of non-finite steps reached the limit during the epoch."""
        values = torch.stack([t.double() for t in (self.steps, self.images, self.skipped, self.run, self.first_hit,
                                                   *self.sums.values())]).tolist()  # exact: counts < 2^53, float32 sums
        steps, images, skipped, run, first = (int(v) for v in values[:5])
        self.ctx.nonfinite_in_a_row = run
        if first >= 0:
            raise Diverged(f"training diverged: {self.limit} non-finite losses in a row (epoch {self.ctx.epoch + 1}, "
                           f"step {self.start + first}); lower optim.lr, or raise max_nonfinite_steps")
        return steps, skipped, images, dict(zip(self.sums, values[5:]))


def finite_flag(loss: torch.Tensor, world_size: int) -> torch.Tensor:
    """1.0 where the loss is finite on every rank, else 0.0: a device tensor, never read by the host (an
    all-reduce of the flag on the device, so all ranks decide alike)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(())
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        bad = bad.reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = bad.reshape(())
    return 1 - bad


def finite_on_every_rank(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on every rank (one all-reduce of a flag, so all ranks decide alike)."""
    return bool(finite_flag(loss, world_size).item())


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU has it (Ampere and later: A100, H100, H200), else float16 with a GradScaler."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def evaluate_method(method: Method, dataset: ReIDDataset, cfg: TrainConfig, prefix: str) -> tuple[dict, list]:
    """Evaluate every network of the method. `<prefix>_mAP` etc. are the first's (`eval_models()`'s first, the
    method's `eval_model()`, e.g. a mean-teacher method's first mean net), whatever the others score: the better
    of two mean nets on the evaluated labels (what the authors' code reports) would be a model selected on the test set's
    labels. Each network's mAP is logged beside (`<prefix>_mAP_<name>`)."""
    results = {name: evaluate_model(m, dataset, cfg, method.device) for name, m in method.eval_models().items()}
    first = next(iter(results))
    metrics = {f"{prefix}_{k}": v for k, v in results[first].items() if k != "cmc"}
    if len(results) > 1:
        metrics.update({f"{prefix}_mAP_{n}": r["mAP"] for n, r in results.items()})
    return metrics, results[first]["cmc"].tolist()


def evaluate_model(model: torch.nn.Module, dataset: ReIDDataset, cfg: TrainConfig, device: torch.device,
                   flip: bool = False) -> dict[str, float | np.ndarray]:
    """mAP, R1, R5, R10 (as percentages) and the CMC curve of `model` on a dataset's query/gallery."""
    (qf, qp, qc), (gf, gp, gc) = query_gallery_features(model, dataset, cfg, device, flip)
    return rank_metrics(pairwise_distance(qf, gf), qp, gp, qc, gc)


def query_gallery_features(model: torch.nn.Module, dataset: ReIDDataset, cfg: TrainConfig, device: torch.device,
                           flip: bool = False) -> list[tuple]:
    """[(features, pids, camids) of the query, ... of the gallery] through the test transform."""
    return [extract_features(model, build_test_loader(dataset.split(split), cfg.transform, cfg.loader), flip=flip,
                             device=device) for split in ("query", "gallery")]


def rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids) -> dict[str, float | np.ndarray]:
    """Market-1501's mAP, R1, R5, R10 (as percentages) and CMC curve of a query x gallery distance matrix."""
    cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50)
    return {"mAP": 100 * mAP, "R1": 100 * float(cmc[0]), "R5": 100 * float(cmc[4]),
            "R10": 100 * float(cmc[9]), "cmc": cmc}


def rng_state() -> dict:
    """torch's (CPU and CUDA), numpy's and python's global RNG states, as tensors and plain types (what the
    safe checkpoint loader reads)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [int(pos), int(has_gauss), float(gauss)],
             "python": torch.tensor(internal, dtype=torch.int64), "python_rest": [int(version), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved (a checkpoint of before this change: torch's only)."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        pos, has_gauss, gauss = state["numpy_rest"]
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, gauss_next = state["python_rest"]
        random.setstate((version, tuple(state["python"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

