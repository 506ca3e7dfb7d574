"""Where runs live: a local folder or any URI that Ray Train's `storage_path` takes (`s3://`, `gs://`, and the
other filesystems of pyarrow.fs), behind a few small functions.

    out = "s3://bucket/runs"                       # or "outputs": every function below works on both
    run = join(out, "baseline-1")                  # "s3://bucket/runs/baseline-1" (a Path for a local folder)
    local = stage(run)                             # a local folder to write the run's files in ...
    upload(local / "best.pt", join(run, "best.pt"))  # ... then copied there (a no-op for a local run)
    path = fetch(join(run, "best.pt"))             # a local copy to read (cached per node, keyed by the URI)

Local paths go through `pathlib` exactly as before; a URI goes through `pyarrow.fs.FileSystem.from_uri`, so
it reads its settings where pyarrow does (for S3 and S3-compatible stores: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or the URI's own `?endpoint_override=...`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from reid_ray import ReidRayError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class Uri(str):
    """A URI that joins like a Path (`folder / "summary.md"`), so code that prints a folder's files works
    with either."""

    def __truediv__(self, part) -> Uri:
        return join(self, str(part))


def is_uri(path) -> bool:
    """`scheme://...` (s3://, gs://, file://, ...), as opposed to a local path."""
    return isinstance(path, str) and bool(_SCHEME.match(path))


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, sep + query


def join(base, *parts: str):
    """`base/part/...`: a Path for a local base, a `Uri` for a URI (its `?query`, if any, kept at the end)."""
    if not is_uri(str(base)) or isinstance(base, Path):
        return Path(base).joinpath(*parts)
    path, query = _split_query(str(base))
    for part in parts:
        path = path.rstrip("/") + "/" + str(part).strip("/") if part else path
    return Uri(path + query)


def split(path) -> tuple:
    """(parent, name) of a local path or a URI."""
    if not is_uri(path):
        p = Path(path).expanduser()
        return p.parent, p.name
    base, query = _split_query(path)
    head, _, name = base.rstrip("/").rpartition("/")
    return Uri(head + query), name


def with_suffix(path, suffix: str):
    """`path` with its last suffix replaced (`x.pt` -> `x.json`), a local path or a URI."""
    if not is_uri(path):
        return Path(path).with_suffix(suffix)
    parent, name = split(path)
    return join(parent, (name.rsplit(".", 1)[0] if "." in name else name) + suffix)


def absolute(path):
    """A local path made absolute (Ray's workers do not run in this directory); a URI as it is."""
    return Uri(path) if is_uri(path) else Path(path).expanduser().resolve()


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _make_folder(fs, p: str) -> None:
    if fs.type_name == "local":  # a file:// URI's folders (an object store has none to make)
        fs.create_dir(p, recursive=True)


def _info(path):
    fs, p = _fs(path)
    return fs.get_file_info(p)


def is_file(path) -> bool:
    if not is_uri(path):
        return Path(path).expanduser().is_file()
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.File


def is_dir(path) -> bool:
    if not is_uri(path):
        return Path(path).expanduser().is_dir()
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.Directory


def exists(path) -> bool:
    if not is_uri(path):
        return Path(path).expanduser().exists()
    import pyarrow.fs

    return _info(path).type != pyarrow.fs.FileType.NotFound


def listing(path, recursive: bool = False) -> list[tuple[str, bool, float]]:
    """(path relative to `path`, is a file, modification time or 0) of what is under a folder or URI."""
    if not is_uri(path):
        root = Path(path).expanduser()
        if not root.is_dir():
            return []
        found = root.rglob("*") if recursive else root.iterdir()
        return [(p.relative_to(root).as_posix(), p.is_file(), p.stat().st_mtime) for p in found]
    import pyarrow.fs

    fs, p = _fs(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(p, allow_not_found=True, recursive=recursive))
    top = p.rstrip("/") + "/"
    return [(i.path[len(top):] if i.path.startswith(top) else i.base_name, i.type == pyarrow.fs.FileType.File,
             i.mtime.timestamp() if i.mtime is not None else 0.0) for i in infos]


def read_text(path) -> str:
    if not is_uri(path):
        return Path(path).expanduser().read_text()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path, text: str) -> None:
    """The whole file at once (an object store's object appears whole; a local file through a rename)."""
    if not is_uri(path):
        from reid_ray import write_text_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
        return
    fs, p = _fs(path)
    _make_folder(fs, p.rsplit("/", 1)[0])
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def upload(local, uri) -> None:
    """A local file or folder copied to `uri` (a file to that file's URI, a folder's files under it). Nothing
    for a local destination: the file is already where it belongs."""
    if not is_uri(uri):
        return
    import pyarrow.fs

    local = Path(local)
    fs, p = _fs(uri)
    _make_folder(fs, p if local.is_dir() else p.rsplit("/", 1)[0])
    pyarrow.fs.copy_files(str(local.resolve()), p, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


def copy(src, dst) -> None:
    """One file from a local path or URI to another (the destination written whole)."""
    if not is_uri(src) and not is_uri(dst):
        tmp = Path(dst).with_name(Path(dst).name + ".tmp")
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return
    if not is_uri(src):
        upload(src, dst)
        return
    if not is_uri(dst):
        download(src, dst)
        return
    import pyarrow.fs

    (sfs, sp), (dfs, dp) = _fs(src), _fs(dst)
    _make_folder(dfs, dp.rsplit("/", 1)[0])
    pyarrow.fs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)


def download(uri, local) -> Path:
    """A file or folder at `uri` copied to the local path `local` (a file through a rename beside it)."""
    import pyarrow.fs

    local = Path(local)
    fs, p = _fs(uri)
    info = fs.get_file_info(p)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    if info.type == pyarrow.fs.FileType.Directory:
        pyarrow.fs.copy_files(p, str(local.resolve()), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return local
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    try:
        pyarrow.fs.copy_files(p, str(tmp.resolve()), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local


def cache_dir() -> Path:
    """Where this node keeps local copies of remote files: `$REID_RAY_CACHE/remote`, else
    `~/.cache/reid_ray/remote` (the data cache's folder, data/readers.py)."""
    from reid_ray.data.readers import default_cache_dir

    return default_cache_dir() / "remote"


def fetch(path) -> Path:
    """A local path to read `path` from: a local path as it is; a remote file downloaded once per node into
    `cache_dir()`, keyed by its URI, size and modification time (a file rewritten there is fetched again)."""
    if not is_uri(path):
        return Path(path).expanduser()
    info = _info(path)
    stamp = f"{path}|{info.size}|{info.mtime.timestamp() if info.mtime is not None else ''}"
    local = cache_dir() / hashlib.sha1(stamp.encode()).hexdigest()[:16] / split(path)[1]
    if not local.is_file():
        download(path, local)
    return local


def stage(path) -> Path:
    """The local folder to write a run's (or a sweep's) files in: the folder itself when `path` is local,
    else a new temporary folder whose files are then `upload`ed to `path`."""
    if not is_uri(path):
        return Path(path)
    return Path(tempfile.mkdtemp(prefix="reid-ray-stage-"))


# --------------------------------------------------------------------------- the kind of a path a flag names

def check_folder(path: str, flag: str, writes: bool = False) -> None:
    """`path` is a folder, or can be made as one (an ancestor that exists is a folder this user can write to)."""
    if not path or is_uri(path):
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ReidRayError(f"{flag} {path}: a file, not a folder; pass a folder (it is made when missing)")
    if writes:
        _writable(p, flag, path)


def check_file(path: str, flag: str, writes: bool = False) -> None:
    """`path` is a file (or, where the run writes it, can be made as one): not a folder."""
    if not path or is_uri(path):
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise ReidRayError(f"{flag} {path}: a folder, not a file; pass a file's path")
    if writes:
        _writable(p.parent, flag, path)


def _writable(folder: Path, flag: str, path: str) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ReidRayError(f"{flag} {path}: {existing} is a file, so no folder can be made under it; pass another path")
    try:  # a real probe (permissions, a read-only mount, root's access() says yes to both), removed at once
        with tempfile.TemporaryFile(dir=existing, prefix=".reid-ray-probe-"):
            pass
    except OSError as e:
        raise ReidRayError(f"{flag} {path}: cannot write in {existing} ({e.strerror}); pass a folder you can "
                           "write to") from None
