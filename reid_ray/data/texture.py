"""Pseudo ground-truth textures for SAN: one aligned full-body texture image per person image.

They live in a folder beside the dataset's split folders (`<dataset top>/texture/`):
  - `<image stem>.png`: one per image, as `reid-ray san-pg predict` writes them;
  - `<pid:04d>.png`: one per identity, as the synthetic benchmark ships them.
Lookup is by stem first, then by pid.

    folder = texture_folder(dataset)                       # ReidRayError if missing, saying how to make it
    ds = TextureDataset(ImageDataset(table, tf, labels), texture_paths(table, folder), (32, 32))
    ds[i]["texture"]                                       # (3, 32, 32), normalised like the images
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from reid_ray import ReidRayError
from reid_ray.data.layouts import LAYOUTS
from reid_ray.data.loader import ImageDataset
from reid_ray.data.readers import ReIDDataset
from reid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def dataset_top(ds: ReIDDataset) -> Path:
    """The dataset's own top folder (which holds its split folders)."""
    for layout in LAYOUTS[ds.name]:
        if (ds.root / layout.top).is_dir():
            return ds.root / layout.top
    raise ReidRayError(f"{ds.name}: no top folder under {ds.root}")


def texture_folder(ds: ReIDDataset, texture_dir: str = "texture") -> Path:
    folder = dataset_top(ds) / texture_dir
    if not folder.is_dir():
        raise ReidRayError(
            f"SAN needs pseudo ground-truth textures in {folder}, which does not exist; make them with "
            f"`reid-ray san-pg predict --checkpoint SAN_PG.pt --dataset {ds.name} --data-root {ds.root}` "
            f"(train SAN_PG.pt with `reid-ray san-pg pairs` + `reid-ray san-pg train`), or regenerate the "
            f"synthetic benchmark without --no-texture")
    return folder


def texture_paths(table: pa.Table, folder: Path) -> list[Path]:
    """Each image's texture: `<stem>.png`, else `<pid:04d>.png`; ReidRayError if some have neither."""
    names = set(os.listdir(folder))
    out, missing = [], []
    for path, pid in zip(table["path"].to_pylist(), table["pid"].to_pylist()):
        stem, by_pid = f"{Path(path).stem}.png", f"{pid:04d}.png"
        name = stem if stem in names else by_pid if by_pid in names else None
        if name is None:
            missing.append(Path(path).name)
        out.append(folder / (name or stem))
    if missing:
        raise ReidRayError(f"{len(missing)} of {len(out)} images have no texture in {folder} (e.g. "
                           f"{missing[0]}: expected {Path(missing[0]).stem}.png or <pid:04d>.png); rerun "
                           f"`reid-ray san-pg predict` for this dataset")
    return out


def texture_transform(size: tuple[int, int]) -> T.Compose:
    """Textures are normalised like the images (same mean/std), so the target lies in the decoder's range."""
    return T.Compose([T.Resize(tuple(size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_texture(path: Path, size: tuple[int, int]) -> torch.Tensor:
    with Image.open(path) as im:
        return texture_transform(size)(im.convert("RGB"))


class TextureDataset(Dataset):
    """An ImageDataset whose items also carry `texture` (3, H_t, W_t); textures are decoded once
    per file and kept (they are shared by every image of an identity on the synthetic benchmark)."""

    def __init__(self, images: ImageDataset, textures: list[Path], size: tuple[int, int], cache: bool = True):
        if len(textures) != len(images):
            raise ValueError(f"{len(textures)} textures for {len(images)} images")
        self.images, self.textures, self.size = images, textures, tuple(size)
        self.cache: dict[Path, torch.Tensor] | None = {} if cache else None

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels

    @labels.setter
    def labels(self, value: np.ndarray) -> None:  # build_train_loader sets the labels of the dataset it gets
        self.images.labels = value

    def __len__(self) -> int:
        return len(self.images)

    def texture(self, i: int) -> torch.Tensor:
        path = self.textures[i]
        if self.cache is None:
            return load_texture(path, self.size)
        if path not in self.cache:
            self.cache[path] = load_texture(path, self.size)
        return self.cache[path]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        out = self.images[item]
        out["texture"] = self.texture(out["index"])
        return out
