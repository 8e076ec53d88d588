"""The one place where exceptions become exit codes, and where signals become a clean interruption."""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer

from ..errors import ENVIRONMENT_ERRNOS, WsfoldError

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_INPUT = 2
EXIT_INTERNAL = 3
# An interrupted run exits 128 + the signal's number, as a shell reports it: 130 for Ctrl-C (SIGINT), 143 for
# SIGTERM (timeout, kill, docker stop, CI cancellation), 129 for SIGHUP.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised where the program is so that every cleanup (temporary files and folders) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The first stop signal received: whatever fails after it (an import it broke, a library that turned the
# KeyboardInterrupt into its own error) is reported as the interruption, not as a bug or a bad input.
RECEIVED: dict[str, int | None] = {"signum": None}


def _on_signal(signum: int, frame: Any) -> None:
    try:
        from ..io.paths import defer_signal
    except ImportError:  # the signal came while wsfold.io.paths itself was imported: nothing is being placed yet
        defer_signal = None
    if RECEIVED["signum"] is None:
        RECEIVED["signum"] = signum
    if defer_signal is not None and defer_signal(signum):
        return  # outputs are being moved into place: raised again once they all are
    # A second signal must not interrupt the cleanup the first one started. (Not SIG_IGN here: a second signal
    # already received but not yet handled would then make Python raise "OSError: Signal 15 ignored due to race
    # condition" in the middle of that cleanup.)
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _ignored)
    raise Interrupted(signum)


def _ignored(signum: int, frame: Any) -> None:
    """A stop signal after the first: nothing to do."""


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C does (Python's default only does so for SIGINT). A signal the caller
    ignores (nohup's SIGHUP, SIGINT for a background job of a script) stays ignored."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN:
            signal.signal(getattr(signal, name), _on_signal)


def ignore_stop_signals() -> None:
    """Once the command has finished (its outputs placed or not), a late signal cannot change what it did: let
    the interpreter shut down without being interrupted, so the exit code says what happened. (SIG_IGN: the
    interpreter's shutdown puts Python-level handlers back to the default, which a late signal would die of.)"""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def interrupted_line(signum: int) -> str:
    from ..io.paths import PLACED

    name = signal.Signals(signum).name
    # What a temporary folder held (quantize's float graph) was placed there and is gone with it: not an output.
    placed = [p for p in PLACED if p.exists() and not any(part.startswith(".wsfold-") for part in p.parts)]
    done = f"only {', '.join(map(str, placed))} was written before" if placed else "no output was written"
    return f"wsfold: interrupted ({name}); {done}."


# Import name -> what to install: wsfold's own dependencies (pyproject.toml).
REQUIRED = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
            "safetensors": "safetensors", "numpy": "numpy", "rich": "rich", "typer": "typer"}  # fmt: skip


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """WsfoldError -> one stderr line and its exit code; a stop signal -> 128 + its number; a closed stdout (e.g.
    `| head -1`) -> 141 as for SIGPIPE, quietly; any other exception is a bug: exit 3 with its location (the whole
    traceback with WSFOLD_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        RECEIVED["signum"] = None  # this command's signals only (tests run many commands in one process)
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe is found here, not in click's exit (which would say exit 1)
            return result
        except typer.Exit:
            raise
        except BaseException as exc:
            if RECEIVED["signum"] is None or isinstance(exc, (SystemExit, GeneratorExit)):
                return _classify(exc)
            print(interrupted_line(RECEIVED["signum"]), file=sys.stderr)
            raise typer.Exit(128 + RECEIVED["signum"]) from None

    def _classify(exc: BaseException) -> Any:
        try:
            raise exc
        except WsfoldError as exc:
            print(f"wsfold: error: {' '.join(str(exc).split())}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            print(interrupted_line(signum), file=sys.stderr)
            raise typer.Exit(128 + signum) from None
        except SystemExit as exc:
            # Only user code exits from inside a command (wsfold's own exits are typer.Exit): the model's or
            # the architecture's code called sys.exit().
            print(
                f"wsfold: error: the model's or architecture's code called sys.exit({exc.code!r}). "
                "Hint: remove the exit from the code that --arch or SOURCE runs.",
                file=sys.stderr,
            )
            raise typer.Exit(EXIT_INPUT) from None
        except BrokenPipeError:
            # Whoever read stdout has gone; nothing more can be said there. Silence the flush at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(128 + signal.SIGPIPE) from None
        except ModuleNotFoundError as exc:
            # A package wsfold depends on is missing from the environment (a wheel installed with --no-deps): the
            # environment's, not a bug; a module of wsfold's own that is missing is.
            if (exc.name or "").split(".")[0] not in REQUIRED:
                raise _bug(exc) from None
            print(
                f"wsfold: error: the package {exc.name.split('.')[0]!r} that wsfold needs is not installed. "
                f"Hint: pip install {REQUIRED[exc.name.split('.')[0]]} (torch first, the way your platform wants).",
                file=sys.stderr,
            )
            raise typer.Exit(EXIT_INPUT) from None
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise _bug(exc) from None
            where = f" ({exc.filename})" if exc.filename else ""
            print(
                f"wsfold: error: the system refused{where}: {os.strerror(exc.errno)}. "
                "Hint: free space, fix permissions or choose another path; nothing partial was kept.",
                file=sys.stderr,
            )
            raise typer.Exit(EXIT_INPUT) from None
        except Exception as exc:  # noqa: BLE001 - the bug boundary
            raise _bug(exc) from None

    return wrapper


def _bug(exc: BaseException) -> typer.Exit:
    if os.environ.get("WSFOLD_DEBUG"):
        traceback.print_exception(exc)
    else:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        print(
            f"wsfold: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            f"(at {frame.filename}:{frame.lineno}). "
            "This is a bug in wsfold; re-run with WSFOLD_DEBUG=1 for the traceback and report it.",
            file=sys.stderr,
        )
    return typer.Exit(EXIT_INTERNAL)
