"""Ray Train's own log lines in a worker: what reid-ray keeps off the user's console, and why.

Ray Train logs every report and checkpoint at INFO (our per-epoch line says the same, shorter), each rank's
whole metrics dict through a logger named by its file, and a training function's exception with its traceback,
which for an error that is the user's to fix (recorded in the run's Verdict and printed by the driver as one
line) is noise. These reach into Ray Train's internal modules, so each is guarded: a Ray without them logs more.
"""

from __future__ import annotations

import logging


class _UserErrorTraceback(logging.Filter):
    """Drops Ray Train's "Error in training function" traceback of an error that is the user's to fix
    (recorded in the run's Verdict and printed by the driver as one line)."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and str(record.msg).startswith("Error in training function"))


USER_ERROR = _UserErrorTraceback()


def quiet_ray_train() -> None:
    try:  # the logger Ray Train v2 reports a training function's exception through
        from ray.train.v2._internal import util as _train_util

        logging.getLogger(_train_util.__name__).addFilter(USER_ERROR)
    except ImportError:
        pass
    # Ray Train logs every report and checkpoint at INFO; our per-epoch line says the same, shorter
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray Train v2 reports each rank's full metrics dict at INFO through a logger named by its file
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
