"""reid-ray: unsupervised domain adaptation person re-identification on Ray."""

__version__ = "0.1.0"


class ReidRayError(Exception):
    """A mistake a user can fix (wrong path, unknown name, bad flag).

    The CLI prints its message on one line and exits with code 2; the message
    always names the problem and the fix.
    """
