"""CamStyle images of a target training set, for ECN's camera invariance (Zhong et al., CVPR 2019).

ECN (after CamStyle, Zhong et al., CVPR 2018) renders every training image under every other camera
of its dataset with a StarGAN and stores them beside the training folder, named
`<stem>_fake_<c>to<c'>.jpg` (MSMT17: `<stem>_fake_<c'>.jpg`). We look for them in `camstyle/`
(the synthetic benchmark's folder) or `bounding_box_train_camstyle/` (the authors' release) next to
the images' own folder:

    versions = camstyle_lookup(target.train["path"].to_pylist())   # list of lists of paths, or None
    ds = CamStyleDataset(target.train, train_transform(tcfg))       # items gain "img_cam"

A dataset without such a folder has no CamStyle images: `CamStyleDataset` then warns once and
its items carry no "img_cam" (ECN trains without the camera-invariance term).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from reid_ray.data.loader import ImageDataset

CAMSTYLE_DIRS = ("camstyle", "bounding_box_train_camstyle")
FAKE_TAG = "_fake_"


def camstyle_lookup(paths: list[str]) -> list[list[str]] | None:
    """For each image path, the paths of its CamStyle versions (sorted; [] when it has none), or
    None when no image folder has a CamStyle folder beside it."""
    by_stem: dict[str, list[str]] = {}
    found = False
    for folder in sorted({str(Path(p).parent) for p in paths}):
        parent = Path(folder).parent
        cam_dir = next((parent / d for d in CAMSTYLE_DIRS if (parent / d).is_dir()), None)
        if cam_dir is None:
            continue
        found = True
        with os.scandir(cam_dir) as it:
            for entry in it:
                if FAKE_TAG in entry.name:
                    stem = entry.name.split(FAKE_TAG, 1)[0]
                    by_stem.setdefault(f"{folder}/{stem}", []).append(entry.path)
    if not found:
        return None
    return [sorted(by_stem.get(str(Path(p).with_suffix("")), [])) for p in paths]


class CamStyleDataset(Dataset):
    """ImageDataset items (indexed by (index, seed)) plus `img_cam`: one of the image's CamStyle
    versions, drawn at random per sample (from the item's seed, so augmentations are reproducible),
    with its own random augmentation. An image whose versions are missing uses itself.

    `has_camstyle` is False when the dataset has no CamStyle folder; items then have no `img_cam`.
    """

    def __init__(self, table: pa.Table, transform, in_memory: bool = False, warn: bool = True):
        self.base = ImageDataset(table, transform, in_memory=in_memory)
        self.versions = camstyle_lookup(self.base.paths)
        self.has_camstyle = self.versions is not None
        if not self.has_camstyle:
            if warn:
                folder = Path(self.base.paths[0]).parent.parent if self.base.paths else "?"
                warnings.warn(f"no CamStyle images ({' or '.join(CAMSTYLE_DIRS)}/ under {folder}): "
                              "training without ECN's camera-invariance term", stacklevel=2)
            return
        self.missing = sum(not v for v in self.versions)
        self.cache = ({p: ImageDataset._load(p) for v in self.versions for p in v} if in_memory else None)

    def __len__(self) -> int:
        return len(self.base)

    def ship(self, uint8: bool, decode: str = "cpu"):
        """As `ImageDataset.ship`, `img_cam` included; always decoded in the loader processes (an item reads
        two files), whatever `decode`."""
        return self.base.ship(uint8)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        out = self.base[item]
        if not self.has_camstyle:
            return out
        i, seed = item if isinstance(item, tuple) else (item, None)
        rng = np.random.default_rng(None if seed is None else [seed, 11])
        choices = self.versions[i]
        if choices:
            path = choices[int(rng.integers(len(choices)))]
            img = self.cache[path] if self.cache is not None else ImageDataset._load(path)
        else:
            img = self.base.cache[i] if self.base.cache is not None else ImageDataset._load(self.base.paths[i])
        if seed is not None:
            torch.manual_seed((seed + 0x5BD1E995) % 2**63)
        out.update(self.base.augment(img, "img_cam"))  # shipped uint8: with its erasing box, `img_cam__erase`
        return out
