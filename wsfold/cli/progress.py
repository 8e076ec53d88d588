"""Progress bars on stderr: on a terminal (or with --progress), never with --json or --quiet."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


class Stages:
    """Turns the core's progress callbacks into one bar a stage; each new stage completes the one before.
    Every method is a no-op when progress is disabled."""

    def __init__(self, progress=None) -> None:
        self._progress = progress
        self._open = None

    def _begin(self, description: str):
        self.finish()
        self._open = self._progress.add_task(description, total=None)
        return self._open

    def finish(self) -> None:
        """Complete the stage still open."""
        if self._progress is not None and self._open is not None:
            self._progress.update(self._open, completed=1, total=1)
        self._open = None

    def reporter(self) -> Callable[[str, int, int], None]:
        """A callback ``cb(stage, done, total)`` (total 0: a stage without a count)."""
        names: dict[str, object] = {}

        def report(stage: str, done: int, total: int) -> None:
            if self._progress is None:
                return
            if names.get(stage) is None or names[stage] != self._open:
                names[stage] = self._begin(stage)
            self._progress.update(names[stage], completed=done, total=total or None)

        return report

    def sequence(self) -> Callable[[str], None]:
        """A callback for a core function that announces its steps by name."""
        report = self.reporter()
        return lambda description: report(description, 0, 0)


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
        stages = Stages(progress)
        try:
            yield stages
        finally:
            stages.finish()
