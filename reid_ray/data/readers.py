"""Read re-ID datasets in their own published layouts into pyarrow manifests.

    >>> ds = read_dataset("market1501", "/data")   # /data/Market-1501-v15.09.15/...
    >>> ds.train.column_names
    ['path', 'pid', 'camid', 'split', 'domain']
    >>> print(ds)                                   # ids / images / cameras per split

A manifest is a `pyarrow.Table` with one row per image: `path` (absolute),
`pid` (the dataset's own identity number), `camid` (0-based), `split`
(train/query/gallery) and `domain` (the dataset name). Junk images (pid -1) are
dropped everywhere; distractors (pid 0) stay where the dataset puts them.

Scans are cached as Parquet under the cache directory (`$REID_RAY_CACHE`, else
`~/.cache/reid_ray`), keyed by the dataset folder and invalidated when any of
its image folders or list files changes (their mtime and size). A failed read
caches nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reid_ray import ReidRayError
from reid_ray.data.folder import (
    FOLDER_PREFIX,
    cache_file,
    cached_cameras,
    folder_cameras,
    folder_spec,
    images_under,
    is_folder,
    save_cameras,
    scan_fingerprint,
    undecodable,
)
from reid_ray.data.layouts import (
    IMAGE_SUFFIXES,
    LAYOUTS,
    FolderLayout,
    Layout,
    ListLayout,
    parse_market_name,
    parse_msmt_name,
)

SPLITS = ("train", "query", "gallery")
MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("pid", pa.int64()),
        ("camid", pa.int64()),
        ("split", pa.string()),
        ("domain", pa.string()),
    ]
)
_CACHE_VERSION = 1


class DatasetError(ReidRayError):
    """A dataset folder that is missing, partial or not in the published layout."""


def dataset_names() -> list[str]:
    """The published layouts' names (a user's folder is `folder:PATH`, data/folder.py)."""
    return sorted(LAYOUTS)


@dataclass(frozen=True)
class ReIDDataset:
    """One dataset: three manifests plus where they came from."""

    name: str
    root: Path  # the folder the user passed (holds the dataset's own top folder)
    train: pa.Table
    query: pa.Table
    gallery: pa.Table
    labelled: bool = True      # False: a user's image folder (`folder:PATH`): no identities, no query/gallery
    cameras_from: str = "file names"  # folder: "sub-folders", "file names" or "none" (one camera), data/folder.py

    def split(self, name: str) -> pa.Table:
        return {"train": self.train, "query": self.query, "gallery": self.gallery}[name]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per split: number of identities, images and cameras."""
        out = {}
        for s in SPLITS:
            t = self.split(s)
            out[s] = {
                "ids": len(pc.unique(t["pid"])),
                "images": t.num_rows,
                "cameras": len(pc.unique(t["camid"])),
            }
        return out

    def digest(self) -> str:
        """A fingerprint of the manifests' content: every split's image paths (relative to the data root), ids
        and cameras. Equal for the same dataset read from another folder; it changes when an image is added,
        removed or relabelled."""
        h, prefix = hashlib.sha1(), str(self.root).rstrip("/") + "/"
        for s in SPLITS:
            t = self.split(s)
            for path, pid, cam in zip(t["path"].to_pylist(), t["pid"].to_pylist(), t["camid"].to_pylist()):
                h.update(f"{s}|{path.removeprefix(prefix)}|{pid}|{cam}\n".encode())
        return h.hexdigest()[:16]

    def __str__(self) -> str:
        if not self.labelled:
            st = self.stats()["train"]
            return (f"{self.name}: {st['images']} unlabelled images, {st['cameras']} camera(s) (from "
                    f"{self.cameras_from}); no identities, no query/gallery (a target only)")
        lines = [f"{self.name} ({self.root})", f"  {'split':<8}{'ids':>8}{'images':>9}{'cameras':>9}"]
        for s, st in self.stats().items():
            lines.append(f"  {s:<8}{st['ids']:>8}{st['images']:>9}{st['cameras']:>9}")
        return "\n".join(lines)


def read_dataset(name: str, root: str | os.PathLike | None, *, variant: str | None = None,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> ReIDDataset:
    """Read dataset `name` from `root`, the folder that holds its published top folder (None for `folder:PATH`).

    `variant` selects CUHK03-NP's "labeled" (default) or "detected" boxes
    (equivalently, name "cuhk03np-detected").
    """
    if is_folder(name):  # a user's unlabelled images, `folder:PATH` (data/folder.py): no root needed
        return read_folder(name, cache_dir)
    if root is None:
        raise DatasetError(f"dataset {name!r} needs --data-root, the folder that holds its own top folder")
    key = name.lower()
    if key == "cuhk03np" and variant not in (None, "labeled"):
        if variant != "detected":
            raise DatasetError(f"cuhk03np variant must be 'labeled' or 'detected', got {variant!r}")
        key = "cuhk03np-detected"
    if key not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist; pass the folder that holds "
                           f"{_expected_tops(key)} (e.g. --data-root /path/to/datasets)")
    layout = next((lo for lo in LAYOUTS[key] if (root / lo.top).is_dir()), None)
    if layout is None:
        raise DatasetError(
            f"{name}: expected folder {_expected_tops(key)} under {root}, found: {_listing(root)}"
            + (". Generate it with `reid-ray synth " + str(root) + "`" if key.startswith("synth") else "")
        )
    top = root / layout.top
    fingerprint = _fingerprint(layout, top)  # also validates that the parts exist
    cache_file = _cache_path(cache_dir, key, top)
    if use_cache:
        cached = _load_cache(cache_file, fingerprint)
        if cached is not None:
            return ReIDDataset(key, root, *cached)
    if isinstance(layout, FolderLayout):
        tables = [_scan_folder(top / getattr(layout, s), s, key) for s in SPLITS]
    else:
        tables = _scan_lists(layout, top, key)
    for s, t in zip(SPLITS, tables):
        if t.num_rows == 0:
            raise DatasetError(f"{name}: split {s!r} under {top} has no images")
    if use_cache:
        _save_cache(cache_file, fingerprint, tables)
    return ReIDDataset(key, root, *tables)


def read_folder(name: str, cache_dir: str | os.PathLike | None = None) -> ReIDDataset:
    """The unlabelled dataset of `folder:PATH` (data/folder.py): every image in its `train` split (pid -1: no
    identity), camera ids from sub-folders, `c<N>` names or one camera, empty query and gallery, `labelled=False`.
    Raises `DatasetError` (one line) for a missing folder, a folder with no images, a link to nothing, or an
    image that does not decode; the scan (each image decoded once) is cached by every file's path, size and mtime."""
    spec = folder_spec(name)
    root = Path(spec[len(FOLDER_PREFIX):])
    if not root.is_dir():
        raise DatasetError(f"--target {name}: {root} is not a folder; pass folder:PATH with the folder of your "
                           "person crops (.jpg/.png, searched recursively)")
    files = sorted(images_under(root))
    if not files:
        raise DatasetError(f"{root} holds no .jpg/.jpeg/.png images (searched recursively); point folder:PATH at the "
                           "folder of your person crops")
    dangling = [f for f in files if not f.exists()]  # a link whose target is gone
    if dangling:
        more = f" and {len(dangling) - 1} more" if len(dangling) > 1 else ""
        raise DatasetError(f"{dangling[0].relative_to(root)} in {root} is a link to a file that does not exist{more}; "
                           "remove the link or point it at an image")
    rel, fingerprint = scan_fingerprint(root, files)
    cache = cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), root)
    cameras, how = cached_cameras(cache, fingerprint)
    if cameras is None:
        errors = undecodable(files)
        if errors:
            p, err = errors[0]
            more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
            raise DatasetError(f"{p.relative_to(root)} in {root} is not a readable image ({err}){more}; remove or "
                               "replace the broken file(s)")
        cameras, how = folder_cameras(rel)
        save_cameras(cache, fingerprint, cameras, how)
    return ReIDDataset(spec, root, _table([str(p) for p in files], [-1] * len(files), cameras, "train", spec),
                       _table([], [], [], "query", spec), _table([], [], [], "gallery", spec), labelled=False,
                       cameras_from=how)


def _expected_tops(key: str) -> str:
    return " or ".join(f"'{lo.top}/'" for lo in LAYOUTS[key])


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing (empty folder)"
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _required_parts(layout: Layout) -> list[str]:
    if isinstance(layout, FolderLayout):
        return [layout.train, layout.query, layout.gallery]
    return [layout.train_dir, layout.test_dir, *layout.train_lists, layout.query_list, layout.gallery_list]


def _fingerprint(layout: Layout, top: Path) -> str:
    missing = [p for p in _required_parts(layout) if not (top / p).exists()]
    if missing:
        raise DatasetError(f"{top} is incomplete: missing {', '.join(missing)}; found: {_listing(top)}")
    parts = []
    for p in _required_parts(layout):
        st = (top / p).stat()
        parts.append(f"{p}:{st.st_mtime_ns}:{st.st_size}")
    return hashlib.sha1("|".join([str(_CACHE_VERSION), str(top), *parts]).encode()).hexdigest()


def _table(paths: list[str], pids: list[int], camids: list[int], split: str, domain: str) -> pa.Table:
    n = len(paths)
    return pa.table(
        {"path": paths, "pid": pids, "camid": camids, "split": [split] * n, "domain": [domain] * n},
        schema=MANIFEST_SCHEMA,
    )


def _scan_folder(folder: Path, split: str, domain: str) -> pa.Table:
    paths, pids, camids, bad = [], [], [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or not entry.name.lower().endswith(IMAGE_SUFFIXES):
            continue  # Thumbs.db, .DS_Store, stray sub-folders
        parsed = parse_market_name(entry.name)
        if parsed is None:
            bad.append(entry.name)
            continue
        pid, camid = parsed
        if pid == -1:
            continue  # junk boxes are never used, for training or evaluation
        paths.append(str(Path(entry.path)))
        pids.append(pid)
        camids.append(camid)
    if bad:
        raise DatasetError(f"{folder}: {len(bad)} image names do not follow '<pid>_c<cam>...' "
                           f"(e.g. {bad[0]!r}); remove them or fix the layout")
    return _table(paths, pids, camids, split, domain)


def _read_list(list_file: Path, image_dir: Path, split: str, domain: str) -> tuple[list, list, list]:
    paths, pids, camids = [], [], []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            rel, pid = fields[0], int(fields[1])
            camid = parse_msmt_name(rel)
        except (IndexError, ValueError):
            raise DatasetError(f"{list_file}:{lineno}: expected 'relpath pid' with a file name like "
                               f"'0000_000_01_0303morning_0015_0.jpg', got {line!r}") from None
        paths.append(str(image_dir / rel))
        pids.append(pid)
        camids.append(camid)
    return paths, pids, camids


def _scan_lists(layout: ListLayout, top: Path, domain: str) -> list[pa.Table]:
    train = ([], [], [])
    for name in layout.train_lists:
        for acc, part in zip(train, _read_list(top / name, top / layout.train_dir, "train", domain)):
            acc.extend(part)
    query = _read_list(top / layout.query_list, top / layout.test_dir, "query", domain)
    gallery = _read_list(top / layout.gallery_list, top / layout.test_dir, "gallery", domain)
    # Lists can be out of sync with the folders (a partial extraction): check a sample.
    for split, (paths, _, _) in zip(SPLITS, (train, query, gallery)):
        for p in paths[:: max(1, len(paths) // 50)]:
            if not os.path.exists(p):
                raise DatasetError(f"{domain}: {split} list names {p}, which does not exist; "
                                   f"the image folders under {top} look incomplete")
    if layout.all_in_train:  # test ids after the training ones, then every image in the training split
        offset = max(train[1]) + 1
        query, gallery = [(q[0], [pid + offset for pid in q[1]], q[2]) for q in (query, gallery)]
        train = tuple(a + b + c for a, b, c in zip(train, query, gallery))
    return [_table(*parts, split, domain) for split, parts in zip(SPLITS, (train, query, gallery))]


def default_cache_dir() -> Path:
    return Path(os.environ.get("REID_RAY_CACHE", Path.home() / ".cache" / "reid_ray"))


def _cache_path(cache_dir, key: str, top: Path) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha1(str(top).encode()).hexdigest()[:16]
    return base / "manifests" / f"{key}-{digest}.parquet"


def _load_cache(path: Path, fingerprint: str) -> list[pa.Table] | None:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid):
        return None
    meta = json.loads((table.schema.metadata or {}).get(b"reid_ray", b"{}"))
    if meta.get("fingerprint") != fingerprint:
        return None
    table = table.replace_schema_metadata(None)
    return [table.filter(pc.equal(table["split"], s)) for s in SPLITS]


def _save_cache(path: Path, fingerprint: str, tables: list[pa.Table]) -> None:
    table = pa.concat_tables(tables)
    table = table.replace_schema_metadata({"reid_ray": json.dumps({"fingerprint": fingerprint})})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # readers never see a half-written manifest
    except OSError:
        pass  # a read-only cache dir only costs a rescan next time
