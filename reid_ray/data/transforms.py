"""BoT transforms (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification", CVPRW 2019): resize, flip, pad + random crop, normalise, and
random erasing (Zhong et al., AAAI 2020) with probability 0.5.

torchvision's transforms v2 on uint8 image tensors (what `torchvision.io.decode_image` gives; PIL
images are accepted too). Random draws come from torch's RNG, which the dataset seeds per sample.
Where each step runs (`LoaderConfig.ship_uint8`, `loader.decode`):

- the geometric steps (resize, flip, pad + crop) run on uint8 where the image is decoded: in the
  loader processes, or batched on the training process's device with `loader.decode=device`
  (`device_augment.py`);
- random erasing is drawn there too, right after the geometric draws, from the same seeded stream
  (`draw_erase_box`), and travels as a box;
- uint8 -> float, normalisation and the erasing itself run on the training process's device, batched
  (`finish.py`): a batch crosses the process boundary as uint8, a quarter of float32's bytes.

`ship_uint8=False` runs the whole transform (`train_transform`) in the loader processes, as one v2
Compose; `split_transform` cuts that same Compose in two, so both paths give the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TransformConfig:
    height: int = 256
    width: int = 128
    flip_prob: float = 0.5
    pad: int = 10                 # pixels of padding before the random crop
    erasing_prob: float = 0.5     # random erasing (REA)
    erasing_scale: tuple[float, float] = (0.02, 0.4)
    erasing_ratio: tuple[float, float] = (0.3, 3.33)


def _to_float() -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(cfg: TransformConfig) -> T.Compose:
    steps = [T.ToImage(), T.Resize((cfg.height, cfg.width), antialias=True), T.RandomHorizontalFlip(cfg.flip_prob)]
    if cfg.pad > 0:
        steps += [T.Pad(cfg.pad), T.RandomCrop((cfg.height, cfg.width))]
    steps += _to_float()
    if cfg.erasing_prob > 0:
        # on normalised tensors, value 0 fills with the dataset mean, as BoT does
        steps.append(T.RandomErasing(cfg.erasing_prob, cfg.erasing_scale, cfg.erasing_ratio, value=0))
    return T.Compose(steps + [T.ToPureTensor()])


def test_transform(cfg: TransformConfig) -> T.Compose:
    return T.Compose([T.ToImage(), T.Resize((cfg.height, cfg.width), antialias=True), *_to_float(), T.ToPureTensor()])


@dataclass(frozen=True)
class Split:
    """A v2 transform cut where it turns float: `uint8` (its steps up to there, run where the image is
    decoded), then scale to [0, 1], `Normalize(mean, std)` and, when it has one, `erasing` (a scalar fill)."""

    uint8: T.Compose
    mean: tuple[float, ...]
    std: tuple[float, ...]
    erasing: T.RandomErasing | None


def split_transform(transform) -> Split | None:
    """`transform` cut in two (`Split`), or None when its float part is not [ToDtype(float32, scale=True),
    Normalize, RandomErasing with a scalar value (optional), ToPureTensor (optional)]: such a transform
    (SAN-PG's colour jitter after the crop, say) runs whole where the image is decoded."""
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else []
    cut = next((k for k, s in enumerate(steps) if isinstance(s, T.ToDtype)), None)
    if cut is None or steps[cut].dtype != torch.float32 or not steps[cut].scale:
        return None
    tail = steps[cut + 1:]
    if tail and isinstance(tail[-1], T.ToPureTensor):
        tail = tail[:-1]
    if not tail or not isinstance(tail[0], T.Normalize):
        return None
    erasing = tail[1] if len(tail) == 2 else None
    scalar_erasing = isinstance(erasing, T.RandomErasing) and erasing.value is not None and len(erasing.value) == 1
    if len(tail) > 2 or (erasing is not None and not scalar_erasing):
        return None
    norm = tail[0]
    return Split(T.Compose([*steps[:cut], T.ToPureTensor()]), tuple(norm.mean), tuple(norm.std), erasing)


NO_BOX = (0, 0, 0, 0)


def view_seed(seed: int, view: int) -> int:
    """The seed of a sample's view (view 0: the sample's own; MMT's second view: another, far away)."""
    return (seed + view * 0x9E3779B9) % 2**63


def draw_erase_box(erasing: T.RandomErasing, shape: tuple[int, int, int]) -> torch.Tensor:
    """RandomErasing's draws for an image of `shape` (C, H, W), in the order its `forward` makes them
    (`torch.rand(1) >= p` skips, else `make_params`): (top, left, h, w) int32, (0, 0, 0, 0) for no box
    (skipped, or ten failed tries). The image's values are never read, so a stride-0 stand-in does."""
    if torch.rand(1) >= erasing.p:
        return torch.tensor(NO_BOX, dtype=torch.int32)
    p = erasing.make_params([torch.empty((), dtype=torch.uint8).expand(*shape)])
    return torch.tensor(NO_BOX if p["v"] is None else (p["i"], p["j"], p["h"], p["w"]), dtype=torch.int32)
