"""reid-ray: unsupervised domain adaptation person re-identification on Ray."""

__version__ = "0.1.0"


class ReidRayError(Exception):
    """A mistake a user can fix (wrong path, unknown name, bad flag).

    The CLI prints its message on one line and exits with code 2; the message
    always names the problem and the fix.
    """


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: readers never see half a file."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
