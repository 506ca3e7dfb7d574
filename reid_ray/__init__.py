"""reid-ray: unsupervised domain adaptation person re-identification on Ray."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
from pathlib import Path

# matplotlib says "findfont: Font family [...] not found. Falling back to DejaVu Sans." at WARNING for each font
# its mathtext knows and the machine lacks (a font cache built by a distribution's matplotlib without the bundled
# fonts): a fallback that changes no picture we draw, printed by every process that draws one (workers, the
# actor, the driver). A successful run prints no warnings.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

__version__ = "0.1.0"


class ReidRayError(Exception):
    """A mistake a user can fix (wrong path, unknown name, bad flag).

    The CLI prints its message on one line and exits with code 2; the message
    always names the problem and the fix.
    """

    def __init__(self, *args):
        # raised in a DataLoader process, torch re-raises it in the training process as
        # `type(e)("Caught X in DataLoader worker process N.\nOriginal Traceback ...\nreid_ray.X: <message>")`:
        # the user's line is the original message, not torch's wrapper
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_loader_message(args[0], type(self).__name__),)
        super().__init__(*args)


_LOADER_WRAPPER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _unwrap_loader_message(message: str, name: str) -> str:
    if not _LOADER_WRAPPER.match(message):
        return message
    found = re.search(rf"^(?:[\w.]+\.)?{name}: (.*)\Z", message, re.MULTILINE | re.DOTALL)
    return found.group(1).strip() if found else message


class Diverged(ReidRayError):
    """Training stopped: too many non-finite losses in a row (`max_nonfinite_steps`). The run ends with
    status "diverged" (MLflow tag, Tune result, summary); the message says what to lower."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or a stop request (SIGTERM: a preemption notice, `ray job stop`, `kill`): the run
    stops its Ray work, keeps its last checkpoint and marks its MLflow run KILLED; the CLI prints the
    command that resumes it and exits 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def catch_stop_signals(again: bool = False) -> None:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread. The first one restores the default
    handlers: a second Ctrl-C stops at once, without the cleanup. `again=True` (init_ray, after `ray.init`,
    which turns SIGTERM into a bare exit): only where a CLI asked for them before."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if again and signal.getsignal(signal.SIGINT) is not _stop:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)


_received: list[int] = []  # the stop signals this process was sent, in order


def _stop(signum, _frame):
    _received.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    raise Interrupted(signum)


def stopped_by(e: KeyboardInterrupt) -> Interrupted:
    """The `Interrupted` a KeyboardInterrupt stands for. Ray's blocking calls (ray.get, ray.wait) turn a
    signal handler's exception into a plain KeyboardInterrupt of their own, so the signal is read back from
    what `_stop` recorded (SIGINT where it recorded none: Python's own Ctrl-C)."""
    if isinstance(e, Interrupted):
        return e
    return Interrupted(_received[-1] if _received else signal.SIGINT)


@contextlib.contextmanager
def full_disk_is_the_users(path: str | os.PathLike, needed_bytes: int | None = None):
    """A write to `path` whose full disk (ENOSPC, EDQUOT; pyarrow's copies and Ray Train's uploads carry only
    the text "No space left") becomes the user's error: one line naming the folder, its free space and what
    the write needed. Any other error stays itself."""
    try:
        yield
    except OSError as e:
        if not (e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)):
            raise
        import shutil

        folder = Path(path).parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        need = f", about {needed_bytes / 2**20:.0f} MiB needed" if needed_bytes else ""
        raise ReidRayError(f"the disk holding {folder} is full ({free}{need}) writing {Path(path).name}: the "
                           "previous checkpoint is intact; free some space (or pass --output on a larger disk), "
                           "then resume with --resume") from None


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
