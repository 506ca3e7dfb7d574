"""The training process's share of a uint8 batch (`transforms.py` says which step runs where).

The loader processes ship each image as uint8 after its geometric steps, and its random-erasing box as
`<key>__erase` (top, left, h, w); `finish_batch` moves the batch to the training process's device and
there, for every uint8 image key at once (`img`, MMT's `img2`, CamStyle's `img_cam`, the `t_` keys of a
PairedLoader), scales to [0, 1], normalises and erases, in batched ops. The ops are transforms v2's
own (`ToDtype(scale=True)`: `to(float32).mul_(1 / 255)`; `Normalize`: `sub_(mean).div_(std)`), so the
batch equals what the whole transform gives in a loader process, bit for bit on the CPU. No random
draw happens here: the training process's RNG state is left as it was.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from reid_ray.data.transforms import Split

ERASE = "__erase"


def is_image(value) -> bool:
    """A collated batch of uint8 images (B, C, H, W): what the loader processes ship."""
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 4


@lru_cache(maxsize=8)
def _stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device, not copied to it every batch
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1) for v in (mean, std))


def finish_images(x: torch.Tensor, boxes: torch.Tensor | None, split: Split) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32, each image's box (B, 4: top, left, h, w; h = w = 0 for
    none) filled with the erasing value (0 on the normalised image: the dataset mean, as BoT)."""
    mean, std = _stats(split.mean, split.std, x.device)
    x = x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
    if boxes is not None and split.erasing is not None:
        top, left, h, w = boxes.to(x.device, non_blocking=True).long().unbind(1)
        rows = torch.arange(x.shape[-2], device=x.device)
        cols = torch.arange(x.shape[-1], device=x.device)
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
        x.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], split.erasing.value[0])
    return x


def finish_batch(batch: dict, split: Split, device: torch.device, move_all: bool = True) -> dict:
    """`batch` with every uint8 image key finished on `device` (its `__erase` boxes consumed) and, with
    `move_all`, every other tensor moved there too (labels, indices: the step finds them in place);
    `move_all=False` leaves them where they are (an extraction loop gathers pids and cameras on the host)."""
    out = {}
    for key, value in batch.items():
        if key.endswith(ERASE):
            continue
        if is_image(value):
            out[key] = finish_images(value.to(device, non_blocking=True), batch.get(key + ERASE), split)
        elif move_all and isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out
