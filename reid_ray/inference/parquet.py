"""A folder of images embedded into a Parquet file (`reid-ray embed`): one row per image, its path inside the
folder, its feature (`inference.embedder`) and the checkpoint's sha256."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from reid_ray import ReidRayError, atomic_path, storage
from reid_ray.inference.embedder import Embedder, metadata, retrieval_module

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(folder: str | Path) -> tuple[Path, list[Path]]:
    """(the folder, its jpg/jpeg/png files at any depth, sorted by their path inside it)."""
    root = Path(folder).expanduser()
    storage.check_folder(str(folder), "--images")
    if not root.is_dir():
        raise ReidRayError(f"--images {folder}: no such folder; pass a folder of .jpg/.jpeg/.png images")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ReidRayError(f"--images {folder}: no .jpg, .jpeg or .png images in it (nor in its subfolders); pass "
                           "the folder that holds them")
    return root, files


class _FolderImages:
    """A folder's images through the checkpoint's test transform (loader processes included); an unreadable
    image comes back as its error, raised in the main process as one line."""

    def __init__(self, files: list[Path], transform, size: tuple[int, int]):
        self.files, self.transform, self.size = [str(f) for f in files], transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        import torch

        from reid_ray.data.loader import ImageDataset

        try:
            return {"img": self.transform(ImageDataset._load(self.files[i])), "error": ""}
        except ReidRayError as e:
            return {"img": torch.zeros(3, *self.size), "error": f"--images: {e}"}


def _loader(files: list[Path], emb: Embedder, batch_size: int | None):
    from torch.utils.data import DataLoader

    from reid_ray.data.loader import loader_kwargs
    from reid_ray.data.transforms import test_transform

    lcfg = dataclasses.replace(emb.cfg.loader, in_memory=False)  # decoded in the loader processes, never held
    kw = loader_kwargs(lcfg)
    kw.pop("persistent_workers", None)
    ds = _FolderImages(files, test_transform(emb.cfg.transform), emb.size)
    return DataLoader(ds, batch_size=batch_size or lcfg.test_batch_size, shuffle=False, **kw)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    # on a terminal (stderr); a log or a pipe gets no bar, so stderr holds only what went wrong
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal)


def embed_folder(emb: Embedder, images: str | Path, out: str | Path, *, batch_size: int | None = None,
                 device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Embed every image of a folder (`list_images`) into a Parquet file, written atomically: columns `path`
    (inside the folder, '/'-separated), `feature` (fixed-size list of D float32, L2-normalised BN features)
    and `model_digest` (the checkpoint's sha256); the schema's metadata repeats it, with the checkpoint,
    network and preprocessing (`metadata`). Returns {"path", "images", "dim"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    root, files = list_images(images)
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise ReidRayError(f"--out {out}: folder {out.parent} does not exist; create it or pick another path")
    if batch_size is not None and batch_size < 1:
        raise ReidRayError(f"--batch-size {batch_size}: must be at least 1")
    device = torch.device(device)
    model = retrieval_module(emb.net).to(device).eval()
    dim = emb.dim
    schema = pa.schema([("path", pa.string()), ("feature", pa.list_(pa.float32(), dim)), ("model_digest", pa.string())],
                       metadata={**metadata(emb), "images": str(root.resolve())})
    rel = [f.relative_to(root).as_posix() for f in files]
    done = 0
    bar = _progress()
    with atomic_path(out) as tmp, pq.ParquetWriter(str(tmp), schema) as writer, bar, torch.no_grad():
        task = bar.add_task(f"embedding {root}", total=len(files), visible=progress)
        try:
            for batch in _loader(files, emb, batch_size):
                bad = next((e for e in batch["error"] if e), None)
                if bad:
                    raise ReidRayError(bad)
                f = model(batch["img"].to(device, non_blocking=True)).float().cpu().numpy()
                n = len(f)
                feature = pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1), pa.float32()), dim)
                writer.write_batch(pa.record_batch([pa.array(rel[done:done + n], pa.string()), feature,
                                                    pa.array([emb.digest] * n, pa.string())], schema=schema))
                done += n
                bar.advance(task, n)
        except BaseException:
            bar.live.transient = True  # the error alone, on one line
            raise
    return {"path": out, "images": done, "dim": dim}
