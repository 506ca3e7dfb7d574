"""`model.cuda_graph`: the training step captured whole in one CUDA graph and replayed for every batch.

A step of the baseline or a mean-teacher method launches about a thousand kernels (forward, backward, the fused optimiser, the
mean nets' update). At ResNet-50's batch of 64 on an H100 the host's time to launch them is about the GPU's time
to run them, so the step waits on Python. Captured once (torch.cuda.graphs' "whole network capture"), a step is
the batch copied into static buffers and one `replay()`.

What a capture asks of the step, and where each is kept:
- every tensor it reads or writes stays at one address between replays:
  - the batch: static buffers, copied into before each replay (`CapturedStep`);
  - the lr: a device tensor in each parameter group, which the scheduler fills in place (`prepare_optimizer`);
  - the optimiser's state: created by the eager warm-up steps before the capture, and reset in place after a
    pseudo-label refresh (`training.optim.reset_optimizer_state`);
  - the mean nets' weight: computed on the device from a step counter the loop fills (`EpochContext.iteration_t`);
  - the epoch's loss sums and step counters, reset in place (`training.loop.StepGraph`);
- no host synchronisation inside: the device-side NaN skip of `train_epoch` (`Method.device_skip` and a fused
  optimiser), and autocast without its weight-cast cache;
- one program and one shape: a new capture when the method's `graph_key()` changes (a clustering that finds
  its own number of clusters) or a batch of another shape arrives.

The first `warmup` steps after each (re)capture run eagerly, on a side stream (cuDNN's autotuning and the
optimiser's lazily created state happen there, outside the capture). They are training steps like the replayed
ones: the same body on the same kind of batch. On a CPU there is nothing to capture; `capture=False` runs the
body eagerly on the static buffers in place of a replay, which is how the tests check everything above but the
capture itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from reid_ray import ReidRayError

# torch.cuda.graphs: a few eager iterations before capturing; eleven where DistributedDataParallel wraps the model
# (its buckets are rebuilt during the first iterations)
WARMUP_STEPS = 3
WARMUP_STEPS_DDP = 11


def check_capture_device(device: torch.device) -> None:
    """`model.cuda_graph=true` on a worker without a CUDA GPU: a clear error, never a silently different run."""
    if device.type != "cuda":
        raise ReidRayError(f"model.cuda_graph=true captures the training step on a CUDA GPU; this worker runs on "
                           f"{device.type}: drop the flag, or run on a GPU (--set use_gpu=true)")


def prepare_optimizer(optimizer: torch.optim.Optimizer, device: torch.device, capture: bool) -> None:
    """Each parameter group's lr as a 0-dim tensor on `device` (the scheduler fills it in place, so a replayed
    step reads the epoch's lr), and `capturable` where the step is captured. The groups must use the fused
    kernel: it reads the lr from the device and skips a NaN step through `found_inf`."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            raise ReidRayError("model.cuda_graph=true needs the fused optimiser kernel; drop --set optim.fused=false")
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["capturable"] = capture  # torch's capturable path exists on CUDA only


def plain_lr(optimizer: torch.optim.Optimizer) -> None:
    """Undo `prepare_optimizer` on groups loaded from a checkpoint: a float lr and this optimiser's own
    `capturable`, whatever the machine that wrote it used."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = optimizer.defaults.get("capturable", False)


class CapturedStep:
    """`body(batch)` (one training step, its results left in tensors it owns) captured in a CUDA graph and
    replayed for each batch. Call it with each batch and the method's `graph_key()`; it warms up, captures
    and replays as the key and the batch's shapes allow. `captures` counts the captures (the CPU stand-in's
    included)."""

    def __init__(self, body: Callable[[dict], Any], optimizer: torch.optim.Optimizer, capture: bool,
                 warmup: int = WARMUP_STEPS):
        self.body, self.optimizer, self.capture, self.warmup = body, optimizer, capture, warmup
        self.key: Any = object()  # matches no key: the first call starts the warm-up
        self.left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict | None = None
        self.captures = 0
        self.side: torch.cuda.Stream | None = None  # one for every warm-up step: the allocator reuses its blocks

    def __call__(self, batch: dict, key: Any = None) -> None:
        full_key = (key, tuple((k, tuple(v.shape), v.dtype) for k, v in batch.items() if isinstance(v, torch.Tensor)))
        if full_key != self.key:
            self.release()
            self.key, self.left = full_key, self.warmup
        if self.left > 0:
            self.left -= 1
            self._eager(batch)
            return
        if self.static is None:
            self._record(batch)
        for k, v in self.static.items():
            if isinstance(v, torch.Tensor):
                v.copy_(batch[k], non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:  # the CPU stand-in of a replay: the same body on the same static buffers
            self.body(self.static)

    def _eager(self, batch: dict) -> None:
        if not self.capture:
            self.body(batch)
            return
        if self.side is None:
            self.side = torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self.body(batch)
        torch.cuda.current_stream().wait_stream(self.side)

    def _record(self, batch: dict) -> None:
        # clones keep each image key's layout (channels_last on a GPU); non-tensor entries are the first batch's
        self.static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.captures += 1
        if not self.capture:
            return
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated in the graph's own memory
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate pinned host memory meanwhile, which the
        # default ("global") mode would count as an error of this capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.body(self.static)
        self.graph = graph  # recorded, not run: the replay that follows runs this batch's step

    def release(self) -> None:
        """Forget the graph and its buffers (a new capture follows); the gradients it owned go with it."""
        if self.graph is not None:
            self.graph.reset()
            self.optimizer.zero_grad(set_to_none=True)
        self.graph, self.static = None, None
