"""The wsfold command line: parses options, calls the core, renders. The only code that prints."""

from __future__ import annotations


def main() -> None:
    from .app import app

    app()
