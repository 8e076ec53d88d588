"""The wsfold command line: parses options, calls the core, renders. The only code that prints."""

from __future__ import annotations


def main() -> None:
    from .app import app
    from .errors import install_signal_handlers

    install_signal_handlers()
    app()
