"""Datasets and loaders built from a manifest (see `readers.py`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.functional import pil_to_tensor

from reid_ray import ReidRayError
from reid_ray.data.device_augment import BatchAugment
from reid_ray.data.finish import ERASE, finish_batch
from reid_ray.data.sampler import CrossCameraSampler, PKSampler
from reid_ray.data.transforms import (
    Split,
    TransformConfig,
    draw_erase_box,
    split_transform,
    test_transform,
    train_transform,
    view_seed,
)

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec, which needs FFmpeg; until that is a
# dependency we keep them (libjpeg-turbo: 1.6x PIL's speed on a 256x128 JPEG, bench/RESULTS.md) without the
# per-image warning
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


def relabel(pids: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Contiguous 0..C-1 training labels for the dataset's own pids (sorted order)."""
    uniq = np.unique(pids)
    mapping = {int(p): i for i, p in enumerate(uniq)}
    return np.searchsorted(uniq, pids), mapping


class ImageDataset(Dataset):
    """Images of a manifest, with labels.

    Items are dicts: `img` (C,H,W float), `label` (training label, or -1),
    `pid`, `camid`, `index` (row in the manifest). `in_memory=True` decodes every
    image once (for small datasets such as the synthetic benchmark). Each image is decoded once per
    item, whatever the number of views.

    How items leave the loader processes is set by `ship` (`make_loader` calls it): by default the whole
    transform runs here (`img` float); shipped uint8, `img` is uint8 after the geometric steps and
    `img__erase` its erasing box, finished on the training process's device (`finish.py`);
    `decode="device"` (a file-backed dataset only): items carry the file's bytes (`encoded`) and the
    augmentation seed instead of `img`, and `decode_batch` decodes a collated batch on that device
    (nvJPEG through `torchvision.io.decode_jpeg` on a GPU) and augments it there, all samples at once,
    each under its own seed (`device_augment.py`). All three give the same batches (bit for bit on the CPU).
    """

    decode = "cpu"
    split: Split | None = None  # set: items ship uint8 (`ship`)
    batch_augment: BatchAugment | None = None  # with decode="device"

    def __init__(self, table: pa.Table, transform, labels: np.ndarray | None = None, in_memory: bool = False,
                 views: int = 1):
        self.paths = table["path"].to_pylist()
        self.pids = table["pid"].to_numpy()
        self.camids = table["camid"].to_numpy()
        self.labels = np.asarray(labels) if labels is not None else np.full(len(self.paths), -1)
        self.transform = transform
        self.views = views  # >1: also `img2`, ... independently augmented views (MMT's two nets)
        self.cache = [self._load(p) for p in self.paths] if in_memory else None

    @staticmethod
    def _load(path: str, data: torch.Tensor | None = None) -> torch.Tensor:
        """(3, H, W) uint8: torchvision's decoder (libjpeg-turbo, libpng), PIL for other formats."""
        try:
            return decode_image(read_file(path) if data is None else data, mode=ImageReadMode.RGB)
        except RuntimeError:  # a format torchvision does not decode (e.g. BMP), or a damaged file
            try:
                with Image.open(path) as im:
                    return pil_to_tensor(im.convert("RGB"))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
                raise ReidRayError(f"{path}: not a readable image ({type(e).__name__}: {e}); replace or delete "
                                   "it") from None

    def __len__(self) -> int:
        return len(self.paths)

    def ship(self, uint8: bool, decode: str = "cpu") -> Split | None:
        """Items as uint8 (`uint8`, or `decode="device"`, which needs it) or float; returns the split of the
        transform that finishes uint8 items, None when they stay float (a transform that cannot be split)."""
        self.decode = "device" if decode == "device" and self.cache is None else "cpu"
        self.split = split_transform(self.transform) if uint8 or self.decode == "device" else None
        self.batch_augment = BatchAugment(self.transform) if self.decode == "device" else None
        return self.split

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """`item` is an index, or (index, seed) from PKSampler: the seed fixes the random augmentation."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        out = {"label": int(self.labels[i]), "pid": int(self.pids[i]), "camid": int(self.camids[i]), "index": i}
        if self.decode == "device" and self.cache is None:  # `decode_batch` decodes and augments on the device
            return {**out, "encoded": read_file(self.paths[i]), "seed": -1 if seed is None else seed}
        img = self.cache[i] if self.cache is not None else self._load(self.paths[i])
        return {**out, **self._views(img, seed)}

    def _views(self, img: torch.Tensor, seed: int | None) -> dict:
        out = {}
        for v in range(self.views):
            if seed is not None:  # torchvision's random transforms draw from torch's global RNG
                torch.manual_seed(view_seed(seed, v))
            out.update(self.augment(img, "img" if v == 0 else f"img{v + 1}"))
        return out

    def augment(self, img: torch.Tensor, key: str) -> dict:
        """`key`: the transformed image; shipped uint8, the geometric steps only and `key__erase`, the
        erasing box drawn next from the same stream (the draws of the whole transform, in its order)."""
        if self.split is None:
            return {key: self.transform(img)}
        x = self.split.uint8(img)
        if self.split.erasing is None:
            return {key: x}
        return {key: x, key + ERASE: draw_erase_box(self.split.erasing, tuple(x.shape))}

    def decode_batch(self, batch: dict, device: torch.device) -> dict:
        """A collated `decode="device"` batch -> the uint8 batch the loader processes would ship, on
        `device`: JPEGs decoded there in one call (other formats on the CPU, then moved), augmented there as
        one batch (`BatchAugment`), torch's RNG state left as it was (the draws are made on the CPU)."""
        encoded = batch.pop("encoded").split(batch.pop("encoded_len").tolist())
        seeds, paths = batch.pop("seed").tolist(), None
        jpeg = [bool(len(e) > 2 and e[0] == 0xFF and e[1] == 0xD8) for e in encoded]
        imgs = [None] * len(encoded)
        if any(jpeg):
            idx = [k for k, j in enumerate(jpeg) if j]
            try:
                decoded = decode_jpeg([encoded[k] for k in idx], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # a damaged JPEG: the per-file path names it
                decoded = [None] * len(idx)
                jpeg = [False] * len(jpeg)
            for k, im in zip(idx, decoded):
                imgs[k] = im
        for k, j in enumerate(jpeg):
            if not j:
                paths = paths or [self.paths[i] for i in batch["index"].tolist()]
                imgs[k] = self._load(paths[k], encoded[k]).to(device)
        return {**batch, **self.batch_augment(imgs, seeds, self.views)}


def _collate(items: list[dict]) -> dict:
    """default_collate, the encoded files (of different lengths) as one flat uint8 tensor and their lengths
    (`encoded_len`): one buffer crosses from the loader process, as a batch of images would."""
    encoded = [it.pop("encoded") for it in items] if "encoded" in items[0] else None
    batch = default_collate(items)
    if encoded is not None:
        batch["encoded"], batch["encoded_len"] = torch.cat(encoded), torch.tensor([len(e) for e in encoded])
    return batch


def training_device() -> torch.device:
    """Where batches are finished: the training process's current GPU (distributed/worker.py sets it), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class FinishingLoader(DataLoader):
    """A DataLoader whose batches cross from its processes as uint8 (images after their geometric steps and
    their erasing boxes, or with `loader.decode=device` the files' bytes), each finished on the training
    process's device as it is yielded (`finish`). `move_all=False` keeps the non-image tensors on the host."""

    def __init__(self, dataset: Dataset, split: Split, move_all: bool = True, **kw):
        super().__init__(dataset, collate_fn=_collate, **kw)
        self.split, self.move_all = split, move_all

    def __iter__(self):
        device = training_device()
        for batch in super().__iter__():
            yield self.finish(batch, device)

    def finish(self, batch: dict, device: torch.device | None = None) -> dict:
        """A collated batch -> what the whole transform gives, on `device` (default: `training_device()`)."""
        device = device or training_device()
        if "encoded" in batch:
            batch = self.dataset.decode_batch(batch, device)
        return finish_batch(batch, self.split, device, self.move_all)


def make_loader(ds: Dataset, lcfg: LoaderConfig | None, move_all: bool = True, **kw) -> DataLoader:
    """The DataLoader of `ds` with `lcfg`'s processes, pinning, shipping (`loader.ship_uint8`) and decoding
    (`loader.decode`): a FinishingLoader for a dataset that can ship uint8 (ImageDataset, CamStyleDataset:
    they have `ship`), a plain one otherwise or with `ship_uint8=False` and `decode=cpu`."""
    kw = {**(loader_kwargs(lcfg) if lcfg is not None else {}), **kw}
    lcfg = lcfg or LoaderConfig()
    split = ds.ship(lcfg.ship_uint8, lcfg.decode) if hasattr(ds, "ship") else None
    if split is None:
        return DataLoader(ds, **kw)
    return FinishingLoader(ds, split, move_all, **kw)


@dataclass
class LoaderConfig:
    num_identities: int = 16      # P
    num_instances: int = 4        # K
    num_workers: int = -1         # DataLoader processes per training worker; -1: from its CPUs (`loader_workers`)
    in_memory: bool = False
    test_batch_size: int = 128
    pin_memory: bool = True       # page-locked batches for asynchronous copies to the GPU (CUDA only)
    prefetch_factor: int = 4      # batches each loader process keeps ready
    decode: str = "cpu"           # cpu: loader processes decode and augment | device: they read the files, the
    #                               training process decodes (nvJPEG on a GPU) and augments on its device
    ship_uint8: bool = True       # loader processes ship uint8 images + erasing boxes, the training process
    #                               normalises and erases on its device (a quarter of the bytes) | False: float32
    #                               batches made in the loader processes (the old path, for comparisons)


def loader_workers(lcfg: LoaderConfig) -> int:
    """Loader processes: `num_workers`, or with -1 one per CPU of this training worker but one (its own
    thread runs the step; its torch threads are its Ray CPU share), at most `MAX_AUTO_WORKERS`, so a GPU
    worker with 16 CPUs gets 15; none for in-memory datasets, whose samples cost microseconds."""
    if lcfg.num_workers >= 0:
        return lcfg.num_workers
    if lcfg.in_memory:
        return 0
    return auto_loader_workers(torch.get_num_threads())


MAX_AUTO_WORKERS = 32


def auto_loader_workers(cpus: int) -> int:
    """`loader.num_workers=-1` on `cpus` CPUs: one each but one, at most MAX_AUTO_WORKERS."""
    return min(MAX_AUTO_WORKERS, max(0, cpus - 1))


def loader_kwargs(lcfg: LoaderConfig) -> dict:
    """The DataLoader arguments every loader shares: processes, pinning, prefetching."""
    workers = loader_workers(lcfg)
    kw = {"num_workers": workers, "pin_memory": lcfg.pin_memory and torch.cuda.is_available()}
    if workers:
        kw.update(persistent_workers=True, prefetch_factor=lcfg.prefetch_factor)
    return kw


def build_train_loader(table: pa.Table, labels: np.ndarray, tcfg: TransformConfig, lcfg: LoaderConfig, *,
                       rank: int = 0, world_size: int = 1, seed: int = 0, views: int = 1,
                       dataset: ImageDataset | None = None, sampler: str = "pk") -> DataLoader:
    """Identity-sampled loader for one rank; call `loader.sampler.set_epoch(e)` every epoch.

    `sampler`: "pk" (P identities × K images per batch, PKSampler) or "cross_camera" (every label once per
    pass, K images from other cameras where it has some: CrossCameraSampler, the authors' sampler for
    pseudo-labels). Pass `dataset` to reuse decoded images when only the labels change (pseudo-labels).
    """
    ds = dataset or ImageDataset(table, train_transform(tcfg), labels, in_memory=lcfg.in_memory, views=views)
    ds.labels = np.asarray(labels)
    if sampler == "cross_camera":
        sampler = CrossCameraSampler(labels, table["camid"].to_numpy(), lcfg.num_instances,
                                     lcfg.num_identities * lcfg.num_instances, world_size, rank, seed)
    elif sampler == "pk":
        sampler = PKSampler(labels, lcfg.num_instances, lcfg.num_identities, world_size, rank, seed)
    else:
        raise ReidRayError(f"unknown sampler {sampler!r}; valid: pk, cross_camera")
    per_rank = lcfg.num_identities // world_size * lcfg.num_instances
    return make_loader(ds, lcfg, batch_size=per_rank, sampler=sampler, drop_last=True)


def epoch_batches(loader, iters: int | None) -> Iterator:
    """One epoch's batches: one pass of `loader`, or exactly `iters` batches, restarting it as often as that
    takes (the authors' `IterLoader`). Pass c > 0 sets the sampler's epoch to `e + 1_000_003·c`, e being the
    epoch the method set, so every pass draws anew and the whole epoch stays a function of (seed, epoch):
    deterministic, resumable, and independent of the worker count."""
    if not iters:
        yield from loader
        return
    start, done = loader.sampler.epoch, 0
    for cycle in range(iters + 1):  # a pass yields ≥ 1 batch, so this many always suffice
        if cycle:
            loader.sampler.set_epoch(start + 1_000_003 * cycle)
        before = done
        for batch in loader:
            yield batch
            done += 1
            if done == iters:
                return
        if done == before:
            raise ReidRayError("the train loader yields no batch: too few images for one batch")


def build_test_loader(table: pa.Table, tcfg: TransformConfig, lcfg: LoaderConfig, *, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """Deterministic loader over this rank's contiguous shard of the table (all of it when world_size=1)."""
    n = table.num_rows
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    ds = ImageDataset(table.slice(lo, hi - lo), test_transform(tcfg), in_memory=lcfg.in_memory)
    # extraction loaders are passed over once per refresh or evaluation: no persistent processes; pids and
    # cameras stay on the host, where extract_features gathers them
    return make_loader(ds, lcfg, move_all=False, batch_size=lcfg.test_batch_size, shuffle=False,
                       persistent_workers=False)
