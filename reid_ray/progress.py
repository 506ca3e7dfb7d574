"""A progress bar for the CLIs' own loops (synthesising, SAN-PG): rich's, the one progress library reid-ray
uses (the live training and sweep display is reid_ray.console)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    def __init__(self, progress: Progress, task: TaskID):
        self.progress, self.task = progress, task

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def info(self, text: str) -> None:
        """What the loop reports beside the bar, e.g. the running loss."""
        self.progress.update(self.task, info=text)


@contextlib.contextmanager
def bar(total: int, description: str, unit: str = "") -> Iterator[Bar]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                        TextColumn(unit), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn())
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, info=""))
