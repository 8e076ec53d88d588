"""Output paths: every file wsfold writes goes through the same checks before any work starts, and is written to
a temporary name beside it, then moved into place without ever replacing a file it was not allowed to."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputError

# Temporary names are short and fixed in length, so that any output name the file system allows also allows them.
TEMP_PREFIX = ".wsfold-"
# Every output moved into place in this process, so that an interruption afterwards can say what was written.
PLACED: list[Path] = []


_HELD = {"depth": 0, "pending": None}


def defer_signal(signum: int) -> bool:
    """Called by a stop-signal handler: True when the signal must wait (files are being moved into place); it is
    then raised again when they all are."""
    if _HELD["depth"] == 0:
        return False
    _HELD["pending"] = _HELD["pending"] or signum
    return True


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Stop signals wait until the block is over, so that the files it moves into place all arrive or none does.
    (Masking would not do: a signal reaches whichever thread of torch's pools does not mask it; the Python
    handler, which consults defer_signal, always runs here.)"""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
        if _HELD["depth"] == 0 and _HELD["pending"] is not None:
            signum, _HELD["pending"] = _HELD["pending"], None
            signal.raise_signal(signum)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file, through links and relative parts alike."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output(
    out: str | Path,
    *,
    force: bool,
    source: str | Path | None = None,
    inputs: Iterable[str | Path | None] = (),
    suffixes: tuple[str, ...] | None = None,
    option: str = "-o",
) -> Path:
    """Validate an output path before any work is done: a known suffix, not one of the inputs (SOURCE, the ONNX
    file being verified, the arch file; through links), a folder that exists and is writable, a name the file
    system allows, and no existing file unless ``force``. ``option`` names the flag in messages."""
    out = Path(out)
    if suffixes and out.suffix not in suffixes:
        onnx_graph = out.suffix == ".onnx" and ".onnx" not in suffixes
        raise OutputError(
            f"{option} {out}: unknown output format {out.suffix or '(no suffix)'!r}.",
            f"use one of: {', '.join(suffixes)}"
            + ("; an ONNX graph is written by `wsfold export --onnx`." if onnx_graph else "."),
        )
    for given in (source, *inputs):
        if given is not None and _same_file(out, Path(given)):
            what = "SOURCE itself" if given is source else f"an input ({given})"
            raise OutputError(
                f"{option} {out} is {what}; wsfold never overwrites its input.", f"choose another path for {option}."
            )
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"{option} {out}: folder {parent} does not exist.", "create it first or choose another path.")
    if not parent.is_dir():
        raise OutputError(f"{option} {out}: {parent} is a file, not a folder.", "choose a path inside a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {out}: folder {parent} is not writable.", "choose a folder you can write to.")
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(
            f"{option} {out!r}: the path is not valid UTF-8 (onnx and safetensors cannot write to it).",
            "choose a UTF-8 name.",
        ) from None
    limit = _name_max(parent)
    if len(os.fsencode(out.name)) > limit:
        raise OutputError(
            f"{option} {out}: the file name is {len(os.fsencode(out.name))} bytes, over this file system's "
            f"limit of {limit}.",
            "choose a shorter name.",
        )
    if out.is_dir():
        raise OutputError(f"{option} {out} is a directory.", f"give a file path with {option}.")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(
            f"{option} {out} already exists.",
            "pass --force (force=True in Python) to replace it, or choose another path.",
        )
    return out


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


# The user's umask while owner_may_write() has relaxed the process's.
_USER_UMASK: list[int] = []


def _umask() -> int:
    """The user's umask (not the relaxed one of owner_may_write)."""
    if _USER_UMASK:
        return _USER_UMASK[0]
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def owner_may_write() -> Iterator[None]:
    """While the block runs, the process's umask leaves the owner's own bits alone: under a umask such as 0277
    every folder made in wsfold's temporary folder (ours, and the exporters' own temporary folders) would be
    unwritable to the process that made it. Outputs still get the user's mode (file_mode). The umask is
    process-wide: another thread creating files meanwhile gets the owner's bits too, nothing more."""
    if _USER_UMASK:
        yield
        return
    with signals_held():
        mask = os.umask(0o022)
        os.umask(mask & ~0o700)
        _USER_UMASK.append(mask)
    try:
        yield
    finally:
        with signals_held():
            os.umask(_USER_UMASK.pop())


def file_mode() -> int:
    """The mode a plain open() would give a new file: 0666 less the umask (mkstemp's own is 0600)."""
    return 0o666 & ~_umask()


def place(tmp: Path, out: Path, *, force: bool) -> None:
    """Move a finished temporary file onto ``out``. Without ``force`` a file that appeared at ``out`` meanwhile
    (another run, another user) is never replaced: a hard link fails on an existing name, where a rename would
    silently replace it."""
    if force:
        os.replace(tmp, out)
        PLACED.append(out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputError(
            f"{out} already exists (it was written while wsfold was working).",
            "pass --force (force=True in Python) to replace it, or choose another path.",
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: the last check and the rename are then two steps.
        if out.exists():
            raise OutputError(f"{out} already exists.", "pass --force (force=True in Python) to replace it.") from None
        os.replace(tmp, out)
        PLACED.append(out)
        return
    PLACED.append(out)
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(out: Path, *, force: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield a path in a temporary folder beside ``out`` (where a writer's own temporary files land too: the
    safetensors writer makes one and renames it); once the block succeeds, give the file the usual mode and move
    it onto ``out`` (see place). On any failure or interruption the folder goes, with whatever it holds.

    Readers never see a partial file either way. ``durable`` also flushes the file to disk (fsync, its disk
    writes started while it is written) before it is moved, and the folder after, so that it survives a power
    loss too: that waits for the disk, as torch.save, safetensors and cp do not."""
    out = Path(out)
    # The output's own suffix last: some writers check it (torch.export.save warns on anything but .pt2).
    suffix = out.suffix if len(out.suffix) <= 16 else ""
    with temp_folder(out) as folder:
        tmp_path = folder / f"out{suffix}"
        with written_back(folder) if durable else contextlib.nullcontext():
            yield tmp_path
        if durable:
            # Read-only: the writer may have created the file without write permission (umask 0277), and
            # fsync needs none.
            with open(tmp_path, "rb") as fh:
                try:
                    os.fsync(fh.fileno())
                except OSError as exc:  # fsync's error names no file: OUT, as every refusal here
                    raise OSError(exc.errno, exc.strerror, str(out)) from None
        os.chmod(tmp_path, file_mode())
        with signals_held():
            place(tmp_path, out, force=force)
        if durable:
            sync_folder(out.parent)  # the new name itself, or a power loss could still lose it


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that names just linked or renamed into it are on disk; nothing on a file system that
    cannot (EINVAL, ENOTSUP) or a system without folder handles."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # no folder handles (Windows)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))  # its error names the folder
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(exc.errno, exc.strerror, str(folder)) from None
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    """libc's sync_file_range (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


@contextlib.contextmanager
def written_back(folder: Path, every: float = 0.05) -> Iterator[None]:
    """While the block writes files in ``folder``, start the disk writes of what each holds so far every
    ``every`` seconds (Linux sync_file_range, from a thread of its own), so that an fsync after the block waits
    for the last part only: on the project's machine an fsync of a 1.5 GB file just written took 1 s, about
    what writing it did. A file replaced by another of the same name (a writer's rename) is followed."""
    start = _sync_file_range()
    if start is None:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        opened: dict[str, tuple[int, int]] = {}  # name: (inode, fd)
        try:
            while not stop.wait(every):
                try:
                    entries = list(os.scandir(folder))
                except OSError:
                    continue
                for entry in entries:
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        have = opened.get(entry.name)
                        if have is None or have[0] != entry.inode():
                            if have is not None:
                                os.close(have[1])
                            opened[entry.name] = (entry.inode(), os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC))
                        start(opened[entry.name][1], 0, 0, _SYNC_FILE_RANGE_WRITE)
                    except OSError:
                        continue
        finally:
            for _, fd in opened.values():
                os.close(fd)

    thread = threading.Thread(target=run, name="wsfold-writeback", daemon=True)
    with signals_held():  # an exception inside Thread.start can leave its lock taken for good
        thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def temp_folder(beside: Path) -> Iterator[Path]:
    """A temporary folder beside ``beside`` (same file system, so its files can be moved into place), removed
    with whatever it holds when the block ends, however it ends."""
    folder = None
    try:
        with owner_may_write():
            with signals_held():  # a stop signal between mkdtemp and this block would leave the folder behind
                folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=Path(beside).parent))
            try:
                yield folder
            except OSError as exc:
                # Named after the output: the temporary file is gone when the error is said.
                if exc.errno is not None and str(exc.filename or "").startswith(str(folder)):
                    raise OSError(exc.errno, exc.strerror, str(beside)) from None
                raise
    finally:
        if folder is not None:
            with signals_held():
                shutil.rmtree(folder, ignore_errors=True)
