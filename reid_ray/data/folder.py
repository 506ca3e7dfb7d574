"""A user's own unlabelled images as a target domain: `--target folder:PATH`.

    --target folder:~/crops            # every .jpg/.jpeg/.png under ~/crops, recursively

Next to the published names (`--target market1501`), `folder:` says that what follows is a path (relative to the
current folder, `~` expanded), not a dataset name. The folder holds person crops with no identity labels: it is a
target to adapt to, never a source, and it has no query/gallery split, so a run on it reports no target mAP.

Camera ids, in this order:
1. the first sub-folder level, when every image sits in a sub-folder and there are at least two
   (`crops/cam1/...`, `crops/entrance/...`: one camera per sub-folder, numbered in sorted order);
2. else a Market-style camera token `c<N>` in every file name (`0001_c3s1_000451.jpg`, `frame_c2_17.png`:
   `c` then digits, at the start of the name or after `_`/`-`, followed by `_`, `-`, `s` or the extension);
3. else one camera for all (the methods' camera-aware parts then fall back, each with one warning).

Every image is decoded once when the folder is first read (a broken file is named before Ray starts); the scan is
cached as Parquet beside the published datasets' manifests, keyed by every file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from reid_ray.data.layouts import IMAGE_SUFFIXES

FOLDER_PREFIX = "folder:"
CAMERA_TOKEN = re.compile(r"(?:^|[_-])c(\d+)(?=[_\-s.])")
_CACHE_VERSION = 1


def is_folder(name: str | None) -> bool:
    """Whether a --source/--target value names an image folder (`folder:PATH`) rather than a dataset."""
    return bool(name) and name.lower().startswith(FOLDER_PREFIX)


def folder_spec(name: str) -> str:
    """`folder:PATH` with PATH absolute (relative to the current folder, `~` expanded): what a run's config keeps,
    so that every Ray worker reads the same folder."""
    path = Path(name[len(FOLDER_PREFIX):]).expanduser()
    return FOLDER_PREFIX + str(path.resolve())


def folder_label(name: str) -> str:
    """The short form of `folder:/abs/crops` for experiment names and tables: `folder:crops`."""
    return FOLDER_PREFIX + Path(name[len(FOLDER_PREFIX):]).name


def folder_cameras(rel_paths: list[str]) -> tuple[list[int], str]:
    """0-based camera ids of images given by their paths inside the folder, and how they were found
    ("sub-folders", "file names" or "none": one camera)."""
    tops = [p.split("/", 1)[0] if "/" in p else None for p in rel_paths]
    if rel_paths and None not in tops and len(set(tops)) >= 2:
        index = {t: i for i, t in enumerate(sorted(set(tops)))}
        return [index[t] for t in tops], "sub-folders"
    tokens = [CAMERA_TOKEN.search(Path(p).name.lower()) for p in rel_paths]
    if rel_paths and all(tokens):
        numbers = sorted({int(t.group(1)) for t in tokens})
        index = {n: i for i, n in enumerate(numbers)}
        return [index[int(t.group(1))] for t in tokens], "file names"
    return [0] * len(rel_paths), "none"


def images_under(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .ipynb_checkpoints, .thumbnails
        for f in filenames:
            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."):
                yield Path(dirpath) / f


def undecodable(files: list[Path]) -> list[tuple[Path, str]]:
    """(path, why) of each image that does not decode, each decoded once (threads: the decoders release the GIL)."""
    from PIL import Image, UnidentifiedImageError

    def bad(path: Path) -> str | None:
        try:
            with Image.open(path) as im:
                im.load()
            return None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return [(p, err) for p, err in zip(files, pool.map(bad, files), strict=True) if err]


def scan_fingerprint(root: Path, files: list[Path]) -> tuple[list[str], str]:
    """(the files' paths inside `root`, with '/'; a digest of each one's path, size and mtime)."""
    rel = [str(p.relative_to(root)).replace(os.sep, "/") for p in files]
    digest = hashlib.sha1("|".join(
        [str(_CACHE_VERSION), *(f"{r}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for r, p in zip(rel, files, strict=True))]
    ).encode()).hexdigest()
    return rel, digest


def cache_file(cache_dir: Path, root: Path) -> Path:
    return cache_dir / "manifests" / f"folder-{hashlib.sha1(str(root).encode()).hexdigest()[:16]}.parquet"


def cached_cameras(path: Path, fingerprint: str) -> tuple[list[int] | None, str]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid):
        return None, ""
    meta = json.loads((table.schema.metadata or {}).get(b"reid_ray", b"{}"))
    if meta.get("fingerprint") != fingerprint:
        return None, ""
    return table["camid"].to_pylist(), meta.get("cameras_from", "none")


def save_cameras(path: Path, fingerprint: str, cameras: list[int], how: str) -> None:
    table = pa.table({"camid": pa.array(cameras, pa.int64())}).replace_schema_metadata(
        {"reid_ray": json.dumps({"fingerprint": fingerprint, "cameras_from": how})})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a decode pass next time
