"""Output paths: refuse to clobber, never touch SOURCE, write atomically (temp file in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def check_output(
    out: Path, *, force: bool, source: Path | None = None, suffixes: tuple[str, ...] | None = None
) -> Path:
    """Validate an output path before any work is done."""
    out = Path(out)
    if suffixes and out.suffix not in suffixes:
        raise OutputError(
            f"{out}: unknown output format {out.suffix or '(no suffix)'!r}.", f"use one of: {', '.join(suffixes)}."
        )
    if source is not None and out.exists() and Path(source).exists() and out.resolve() == Path(source).resolve():
        raise OutputError(f"{out} is SOURCE itself; wsfold never overwrites its input.", "choose another path with -o.")
    if out.is_dir():
        raise OutputError(f"{out} is a directory.", "give a file path with -o.")
    if out.exists() and not force:
        raise OutputError(f"{out} already exists.", "pass --force to replace it, or choose another path with -o.")
    if not out.parent.exists():
        raise OutputError(f"folder {out.parent} does not exist.", "create it first or choose another path.")
    return out


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """Yield a temp path beside ``out``; rename it onto ``out`` only if the block succeeds, else remove it."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
