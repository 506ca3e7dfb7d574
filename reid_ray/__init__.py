"""reid-ray: unsupervised domain adaptation person re-identification on Ray."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__version__ = "0.1.0"


class ReidRayError(Exception):
    """A mistake a user can fix (wrong path, unknown name, bad flag).

    The CLI prints its message on one line and exits with code 2; the message
    always names the problem and the fix.
    """


class Diverged(ReidRayError):
    """Training stopped: too many non-finite losses in a row (`max_nonfinite_steps`). The run ends with
    status "diverged" (MLflow tag, Tune result, summary); the message says what to lower."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds, removed
    when it fails. Readers (and a writer killed mid-write) never leave half a file under `path`:

        with atomic_path(out / "best.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix kept: savefig reads it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
