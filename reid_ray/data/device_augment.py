"""`loader.decode=device`: the uint8 steps of a BoT transform (resize, flip, pad + crop) and the erasing
draws, for a whole decoded batch at once on the training process's device.

Each image size is resized in one call; then one `where` flips the batch, one pad pads it and one
gather takes each sample's crop window. The per-sample random parameters are drawn on the CPU under the
sample's seed, in torchvision's own order (a flip: `torch.rand(1) >= p` skips it; a crop:
`RandomCrop.make_params` on the padded shape; erasing: `draw_erase_box`), inside
`torch.random.fork_rng`, so the batch equals what the loader processes make from the same files (bit for
bit on the CPU) and the training process's RNG state is left as it was. Only the CPU generator is seeded
(`torch.default_generator`): the draws are the same as under `torch.manual_seed`, and no GPU's state is
touched.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from reid_ray import ReidRayError
from reid_ray.data.finish import ERASE
from reid_ray.data.transforms import draw_erase_box, split_transform, view_seed

BATCHED = (T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop)


def _pad_amounts(padding) -> tuple[int, int, int, int]:
    """T.Pad's `padding` as (left, top, right, bottom), as torchvision reads it."""
    p = [padding] if isinstance(padding, int) else list(padding)
    return tuple(p * 4) if len(p) == 1 else (p[0], p[1], p[0], p[1]) if len(p) == 2 else tuple(p)


class BatchAugment:
    """The uint8 steps of a transform (`split_transform`), batched: a Resize to a fixed (H, W) first, then
    any of RandomHorizontalFlip, Pad, RandomCrop (without its own padding) in the transform's order."""

    def __init__(self, transform):
        split = split_transform(transform)
        steps = [s for s in split.uint8.transforms if not isinstance(s, (T.ToImage, T.ToPureTensor))] if split else []
        resize = steps[0] if steps else None
        ok = (isinstance(resize, T.Resize) and len(resize.size) == 2 and resize.max_size is None
              and all(isinstance(s, BATCHED[1:]) for s in steps[1:])
              and not any(isinstance(s, T.RandomCrop) and (s.padding is not None or s.pad_if_needed) for s in steps))
        if not ok:
            raise ReidRayError(f"loader.decode=device batches BoT's transforms (Resize((H, W)), flip, pad, crop, then "
                               f"ToDtype, Normalize, RandomErasing); this dataset's is {transform}: use loader.decode=cpu")
        self.resize, self.steps, self.erasing = resize, steps[1:], split.erasing

    def draw(self, seed: int) -> tuple[list, torch.Tensor | None]:
        """One view's parameters under `seed` (a negative seed: the running stream): a bool per flip, a
        (top, left) per crop, then the erasing box (None without erasing)."""
        if seed >= 0:
            torch.default_generator.manual_seed(seed)
        (h, w), params = self.resize.size, []
        for s in self.steps:
            if isinstance(s, T.Pad):
                left, top, right, bottom = _pad_amounts(s.padding)
                h, w = h + top + bottom, w + left + right
            elif isinstance(s, T.RandomHorizontalFlip):
                params.append(not bool(torch.rand(1) >= s.p))
            else:
                p = s.make_params([torch.empty((), dtype=torch.uint8).expand(3, h, w)])
                params.append((p["top"], p["left"]))
                h, w = p["height"], p["width"]
        return params, (draw_erase_box(self.erasing, (3, h, w)) if self.erasing is not None else None)

    def resized(self, imgs: list[torch.Tensor]) -> torch.Tensor:
        """The decoded images (C, H_i, W_i), resized into one (B, C, H, W) batch: one call per input size."""
        groups: dict[tuple, list[int]] = {}
        for k, im in enumerate(imgs):
            groups.setdefault(tuple(im.shape), []).append(k)
        out = None
        for idx in groups.values():
            y = self.resize(torch.stack([imgs[k] for k in idx]))
            out = y.new_empty((len(imgs), *y.shape[1:])) if out is None else out
            out[torch.tensor(idx, device=y.device)] = y
        return out

    def apply(self, x: torch.Tensor, params: list[list]) -> torch.Tensor:
        """The random steps on the resized batch, each sample with its own draws, one op per step."""
        k, rng = 0, lambda n: torch.arange(n, device=x.device)
        for s in self.steps:
            if isinstance(s, T.Pad):
                x = s(x)
                continue
            column, k = [p[k] for p in params], k + 1
            if isinstance(s, T.RandomHorizontalFlip):
                x = torch.where(torch.tensor(column, device=x.device)[:, None, None, None], x.flip(-1), x)
            else:  # each sample's window of the (padded) batch: one gather
                top, left = torch.tensor(column, device=x.device).unbind(1)
                rows, cols = top[:, None] + rng(s.size[0]), left[:, None] + rng(s.size[1])
                b, c = rng(len(x))[:, None, None, None], rng(x.shape[1])[None, :, None, None]
                x = x[b, c, rows[:, None, :, None], cols[:, None, None, :]]
        return x

    def __call__(self, imgs: list[torch.Tensor], seeds: list[int], views: int = 1) -> dict:
        """`img` (and `img2`, ... for more views) as uint8 (B, C, H, W), with their `__erase` boxes: what the
        loader processes would have shipped for these images and seeds (-1: no seed)."""
        x = self.resized(imgs)
        with torch.random.fork_rng(devices=[]):
            draws = [[self.draw(-1 if s < 0 else view_seed(s, v)) for v in range(views)] for s in seeds]
        out = {}
        for v in range(views):
            key = "img" if v == 0 else f"img{v + 1}"
            out[key] = self.apply(x, [d[v][0] for d in draws])
            if self.erasing is not None:
                out[key + ERASE] = torch.stack([d[v][1] for d in draws])
        return out
