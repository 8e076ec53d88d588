"""The wsfold command line: parses options, calls the core, renders. The only code that prints."""

from __future__ import annotations


def _click_exceptions():
    """The click that typer runs on: its own vendored copy in recent typer, click itself before."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - typer < 0.29
        from click import exceptions
    return exceptions


def _huge_pages_for_torch() -> None:
    """Before torch is imported: let its CPU allocator back tensors of 2 MB and more with transparent huge pages
    (``THP_MEM_ALLOC_ENABLE``, unless the environment says otherwise) where the kernel offers them. A large
    tensor is then faulted in 2 MB at a time instead of 4 KB: the layers' own weight code runs ~30% faster on a
    wide network."""
    import os
    import sys

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            offered = "[never]" not in fh.read()
    except OSError:
        return
    if offered and "torch" not in sys.modules and not os.environ.get("THP_MEM_ALLOC_ENABLE"):
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # an empty value is unset (torch would warn about it)


def _closed_streams_to_devnull() -> None:
    """A stream closed by the caller (``>&-``, ``2>&-``) is None in Python: nothing wsfold says there can be read,
    so it goes nowhere instead of failing the command (the files written are what was asked for)."""
    import os
    import sys

    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - for the life of the process


def main() -> None:
    import sys

    from .errors import EXIT_INPUT, ignore_stop_signals, install_signal_handlers

    _closed_streams_to_devnull()

    install_signal_handlers()  # before the heavy imports: a signal during them is an interruption too
    _huge_pages_for_torch()
    from .app import app

    clicks = _click_exceptions()
    try:
        # Not standalone: a usage error reaches us, to be said in one line like every other bad input.
        code = app(standalone_mode=False)
    except clicks.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "usage: wsfold COMMAND --help")
        sys.exit(EXIT_INPUT)
    except clicks.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "wsfold"
        message = " ".join(exc.format_message().split())
        print(f"wsfold: error: {message} Hint: see `{command} --help`.", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except Exception as exc:
        if type(exc).__name__ != "Abort":
            raise
        _interrupted(exc.__cause__)  # click turns a signal before the command starts into Abort
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    ignore_stop_signals()  # done: a signal during the interpreter's shutdown cannot change what was done
    _quick_shutdown()
    sys.exit(code if isinstance(code, int) else 0)


def _quick_shutdown() -> None:
    """Spare the interpreter's shutdown its garbage collections over everything torch defined (~0.4 s of the
    ~0.6 s it takes after importing torch, measured here): objects alive now are moved out of the collector's
    sight (gc.freeze). They are still freed as modules are torn down, and every exit handler still runs."""
    import gc

    gc.freeze()


def _interrupted(exc: BaseException | None) -> None:
    import signal
    import sys

    from .errors import RECEIVED, ignore_stop_signals, interrupted_line

    signum = RECEIVED["signum"] or getattr(exc, "signum", signal.SIGINT)
    ignore_stop_signals()
    print(interrupted_line(signum), file=sys.stderr)
    sys.exit(128 + signum)
