"""The two rich consoles: results to stdout, logs and progress to stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

__all__ = ["download_bar", "stderr_console", "stdout_console"]

stdout_console = Console()
stderr_console = Console(stderr=True)


@contextmanager
def download_bar(label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A transient download bar on stderr; yields the `(done, total)` callback data/ loaders take."""
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        task = bar.add_task("download", total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
