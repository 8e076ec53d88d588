"""Progress bars on stderr: on a terminal (or with --progress), never with --json or --quiet."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


class Stages:
    """Hands out progress callbacks ``cb(done, total)`` for named stages; no-ops when disabled."""

    def __init__(self, progress=None) -> None:
        self._progress = progress

    def stage(self, description: str) -> Callable[[int, int], None]:
        if self._progress is None:
            return lambda done, total: None
        task = self._progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(task, completed=done, total=total)

        return update

    def sequence(self) -> Callable[[str], None]:
        """A callback for a core function that announces its steps by name; each new one completes the last."""
        current: list[Callable[[], None]] = []

        def announce(description: str) -> None:
            if current:
                current.pop()()
            current.append(self.step(description))

        return announce

    def step(self, description: str):
        """A stage with no count: shown as a spinner until the next one starts."""
        cb = self.stage(description)
        cb(0, 1)
        return lambda: cb(1, 1)


def wants_progress(*, json_output: bool, quiet: bool, forced: bool) -> bool:
    if json_output or quiet:
        return False
    return forced or sys.stderr.isatty()


@contextlib.contextmanager
def progress_stages(enabled: bool) -> Iterator[Stages]:
    if not enabled:
        yield Stages(None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield Stages(progress)
