"""BoT transforms (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification", CVPRW 2019): resize, flip, pad + random crop, normalise, and
random erasing (Zhong et al., AAAI 2020) with probability 0.5.

torchvision's transforms v2 on uint8 image tensors (what `torchvision.io.decode_image` gives; PIL
images are accepted too): the float conversion comes after the geometric steps, so they move a
quarter of the bytes. Random draws come from torch's RNG, which the dataset seeds per sample.
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
