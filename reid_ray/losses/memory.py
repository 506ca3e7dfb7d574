"""What the feature memories of ECN and SpCL share: a product with the memory that updates it after use.

    scores = MemoryProduct.apply(inputs, memory, write_feats, write_indices, rate, update)

forward: inputs (B, d) -> inputs · memoryᵀ (B, N). backward: dL/dinputs = dL/dscores · memory, computed with
the rows as they were in forward, then `update(memory, write_feats, write_indices, rate)` writes the memory in
place. A static autograd Function (the authors' legacy non-static ones are rejected by current PyTorch); the
memory is kept by reference, not saved, since it is written only after it has served the gradient. Under DDP
the callers all-gather what to write in forward (`all_gather_rows`), so every rank applies the same update and
no collective runs inside backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class MemoryProduct(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, inputs, memory, write_feats, write_indices, rate, update):
        ctx.memory, ctx.rate, ctx.update = memory, rate, update
        ctx.save_for_backward(write_feats, write_indices)
        return inputs.mm(memory.t())

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_outputs):
        write_feats, write_indices = ctx.saved_tensors
        grad_inputs = grad_outputs.mm(ctx.memory) if ctx.needs_input_grad[0] else None
        ctx.update(ctx.memory, write_feats, write_indices, ctx.rate)
        return grad_inputs, None, None, None, None, None


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every DDP rank, in rank order (no gradient; equal row counts on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)
