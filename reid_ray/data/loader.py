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
from reid_ray.data.sampler import CrossCameraSampler, PKSampler
from reid_ray.data.transforms import TransformConfig, test_transform, train_transform

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
    image once (for small datasets such as the synthetic benchmark).

    `decode="device"` (a file-backed dataset only): items carry the file's bytes (`encoded`) and the
    augmentation seed instead of `img`, and `finish` decodes a collated batch on the training process's
    device (nvJPEG through `torchvision.io.decode_jpeg` on a GPU) and augments it there, each sample under
    its own seed, so the batch equals what `decode="cpu"` gives (bit for bit on the CPU).
    """

    decode = "cpu"

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

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """`item` is an index, or (index, seed) from PKSampler: the seed fixes the random augmentation."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        out = {"label": int(self.labels[i]), "pid": int(self.pids[i]), "camid": int(self.camids[i]), "index": i}
        if self.decode == "device" and self.cache is None:  # `finish` decodes and augments on the device
            return {**out, "encoded": read_file(self.paths[i]), "seed": -1 if seed is None else seed}
        img = self.cache[i] if self.cache is not None else self._load(self.paths[i])
        return {**out, **self._views(img, seed)}

    def _views(self, img: torch.Tensor, seed: int | None) -> dict:
        out = {}
        for v in range(self.views):
            if seed is not None:  # torchvision's random transforms draw from torch's global RNG
                torch.manual_seed((seed + v * 0x9E3779B9) % 2**63)
            out["img" if v == 0 else f"img{v + 1}"] = self.transform(img)
        return out

    def finish(self, batch: dict, device: torch.device) -> dict:
        """A collated `decode="device"` batch -> the batch of `decode="cpu"`, its images on `device`: JPEGs
        decoded there in one call (other formats on the CPU, then moved), the augmentations applied there
        per sample under its seed, torch's own RNG state left as it was (the draws are made on the CPU)."""
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
        # torch.manual_seed (each sample's seed) also seeds every CUDA device: the training process's state
        # of the decoding GPU (dropout, random erasing's draws there) is restored with the CPU's
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            views = [self._views(im, None if s < 0 else s) for im, s in zip(imgs, seeds)]
        return {**batch, **{key: torch.stack([v[key] for v in views]) for key in views[0]}}


def _collate(items: list[dict]) -> dict:
    """default_collate, the encoded files (of different lengths) as one flat uint8 tensor and their lengths
    (`encoded_len`): one buffer crosses from the loader process, as a batch of images would."""
    encoded = [it.pop("encoded") for it in items] if "encoded" in items[0] else None
    batch = default_collate(items)
    if encoded is not None:
        batch["encoded"], batch["encoded_len"] = torch.cat(encoded), torch.tensor([len(e) for e in encoded])
    return batch


class DecodingLoader(DataLoader):
    """A DataLoader over a `decode="device"` dataset: its loader processes read files and collate them; each
    batch is decoded and augmented on the training process's device as it is yielded (`ImageDataset.finish`)."""

    def __iter__(self):
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        for batch in super().__iter__():
            yield self.dataset.finish(batch, device)


def make_loader(ds: Dataset, lcfg: LoaderConfig | None, **kw) -> DataLoader:
    """The DataLoader of `ds` with `lcfg`'s processes, pinning and decoding (`loader.decode`): a
    DecodingLoader when the images are decoded on the device, a plain one otherwise."""
    kw = {**(loader_kwargs(lcfg) if lcfg is not None else {}), **kw}
    decode = lcfg.decode if lcfg is not None else "cpu"
    if isinstance(ds, ImageDataset) and ds.cache is None and decode == "device":
        ds.decode = "device"
        return DecodingLoader(ds, collate_fn=_collate, **kw)
    return DataLoader(ds, **kw)


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


def loader_workers(lcfg: LoaderConfig) -> int:
    """Loader processes: `num_workers`, or with -1 one per CPU of this training worker but one (its own
    thread runs the step), at most 8; none for in-memory datasets, whose samples cost microseconds."""
    if lcfg.num_workers >= 0:
        return lcfg.num_workers
    if lcfg.in_memory:
        return 0
    return min(8, max(0, torch.get_num_threads() - 1))


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
    # extraction loaders are passed over once per refresh or evaluation: no persistent processes
    return make_loader(ds, lcfg, batch_size=lcfg.test_batch_size, shuffle=False, persistent_workers=False)
