"""Typer app: each command parses options, calls the core, and renders; no logic of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import EXIT_VERIFY_FAILED, handle_errors
from .progress import progress_stages, wants_progress

app = typer.Typer(
    name="wsfold",
    help="Bake weight-standardized layers into plain convolutions, export constant-weight ONNX, verify it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Source = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: .pt/.pth/.bin (state dict or training checkpoint) or .safetensors.", show_default=False
    ),
]
Arch = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture for a state dict: package.module:callable or path/to/file.py:callable."),
]
ArchKwargs = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch.")]
StateKey = Annotated[
    str | None,
    typer.Option("--state-key", help="Key of the state dict inside a training checkpoint (dotted for nesting)."),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow loading a whole pickled nn.Module (runs code from the file: only for files you trust).",
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")]
ShowProgress = Annotated[
    bool, typer.Option("--progress", help="Show progress bars even when stderr is not a terminal.")
]
NoFold = Annotated[
    bool, typer.Option("--no-fold", help="Do not fold inference-static normalizers into the baked layers.")
]


def _stdout():
    from rich.console import Console

    return Console(soft_wrap=False)


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _load(source: Path, arch, arch_kwargs, state_key, allow_pickle, stages):
    from ..load import load_model

    done = stages.step(f"load {source.name}")
    loaded = load_model(source, arch=arch, arch_kwargs=arch_kwargs, state_key=state_key, allow_pickle=allow_pickle)
    done()
    return loaded


@app.command()
@handle_errors
def inspect(
    source: Source,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    state_key: StateKey = None,
    allow_pickle: AllowPickle = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
    progress: ShowProgress = False,
) -> None:
    """List the weight-standardized (derived-weight) layers of SOURCE, their formula and eps. Writes nothing."""
    from ..detect import detect_layers
    from . import render

    with progress_stages(wants_progress(json_output=json_output, quiet=quiet, forced=progress)) as stages:
        loaded = _load(source, arch, arch_kwargs, state_key, allow_pickle, stages)
        detection = detect_layers(loaded.model, progress=stages.stage("probe layers"))
    payload = {"source": str(source), **detection.to_dict()}
    if json_output:
        _emit_json(payload)
    elif not quiet:
        render.detection(_stdout(), source, detection)


@app.command()
@handle_errors
def bake(
    source: Source,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output: .pt (whole module) or .safetensors (state dict + manifest). "
            "Default: SOURCE's stem + .baked.pt beside it.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists (never SOURCE).")] = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    state_key: StateKey = None,
    allow_pickle: AllowPickle = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
    progress: ShowProgress = False,
) -> None:
    """Write a checkpoint whose weight-standardized layers are plain layers holding the exact standardized weights."""
    from ..bake import bake_model
    from ..detect import detect_layers
    from ..io import check_output
    from ..save import SUFFIXES, save_baked
    from . import render

    out = output or source.with_name(f"{source.name.split('.')[0]}.baked.pt")
    check_output(out, force=force, source=source, suffixes=SUFFIXES)
    with progress_stages(wants_progress(json_output=json_output, quiet=quiet, forced=progress)) as stages:
        loaded = _load(source, arch, arch_kwargs, state_key, allow_pickle, stages)
        detection = detect_layers(loaded.model, progress=stages.stage("probe layers"))
        baked, report = bake_model(loaded.model, detection, inplace=True, progress=stages.stage("bake layers"))
        done = stages.step(f"write {out.name}")
        save_baked(baked, report, out, force=force, source=source)
        done()
    payload = {"source": str(source), "output": str(out), **detection.to_dict()}
    if json_output:
        _emit_json(payload)
    elif not quiet:
        console = _stdout()
        render.detection(console, source, detection)
        console.print(f"wrote {out} ({len(report.baked)} layer(s) baked)")


def run() -> None:  # pragma: no cover - entry point used by tests through subprocess
    app()


__all__ = ["app", "EXIT_VERIFY_FAILED"]
