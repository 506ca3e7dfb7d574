"""A progress bar for the CLIs' own loops (synthesising, the texture generator), in the live displays' columns
(reid_ray.tracking.console.make_progress): rich, the one progress library reid-ray uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import Progress, TaskID

from reid_ray.tracking.console import console, make_progress


class Bar:
    def __init__(self, progress: Progress, task: TaskID, unit: str):
        self.progress, self.task, self.unit = progress, task, unit

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def info(self, text: str) -> None:
        """What the loop reports beside the bar, e.g. the running loss."""
        self.progress.update(self.task, status=f"{self.unit}  {text}")


@contextlib.contextmanager
def bar(total: int, description: str, unit: str = "") -> Iterator[Bar]:
    with make_progress(console()) as progress:
        yield Bar(progress, progress.add_task(description, total=total, status=unit), unit)
