"""The one place where exceptions become exit codes."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_INPUT = 2
EXIT_INTERNAL = 3


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """WsfoldError -> one stderr line and its exit code; any other exception is a bug: exit 3 with its location
    (the whole traceback with WSFOLD_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import WsfoldError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except WsfoldError as exc:
            print(f"wsfold: error: {' '.join(str(exc).split())}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("wsfold: interrupted; no output was written.", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the bug boundary
            if os.environ.get("WSFOLD_DEBUG"):
                traceback.print_exc()
            else:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                print(
                    f"wsfold: internal error: {type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno}). "
                    "This is a bug in wsfold; re-run with WSFOLD_DEBUG=1 for the traceback and report it.",
                    file=sys.stderr,
                )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper
