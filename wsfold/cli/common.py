"""What every command shares: its option declarations (once each), output to stdout or JSON, loading SOURCE."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .progress import progress_stages, wants_progress

Source = Annotated[
    Path,
    typer.Argument(
        help=(
            "Checkpoint: .pt/.pth/.bin (state dict or training checkpoint), .safetensors, a model directory "
            "(transformers' save_pretrained, timm's save_for_hf), or a .pt2 torch.export program "
            "(needs --allow-pickle)."
        ),
        show_default=False,
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
ForceOnnx = Annotated[bool, typer.Option("--force", help="Replace the ONNX file if it exists.")]
ShowProgress = Annotated[
    bool, typer.Option("--progress", help="Show progress bars even when stderr is not a terminal.")
]
AllowNonfinite = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        help="Bake layers whose weight holds NaN or inf as they are (refused otherwise: the model computes NaN).",
    ),
]
NoFold = Annotated[
    bool, typer.Option("--no-fold", help="Do not fold inference-static normalizers into the baked layers.")
]


def _stdout():
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits 1 here, the code that says "verification failed": let handle_errors say 141 instead.
            self.quiet = True
            raise BrokenPipeError

    # Not a terminal (a file, a pipe, CI's log): nothing to fit, so no column is cut or folded to 80 characters.
    width = None if sys.stdout.isatty() else 1000
    return _Console(soft_wrap=False, width=width)


def _finite(value: Any) -> Any:
    """NaN and infinities as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _running(json_output: bool, quiet: bool, progress: bool):
    """What every command runs its core call under: stdout kept for --json, progress bars where wanted."""
    with (
        _stdout_for(json_output),
        progress_stages(wants_progress(json_output=json_output, quiet=quiet, forced=progress)) as stages,
    ):
        yield stages


def _input_options(input_shape, input_dtype, dtype):
    """--input-shape, --input-dtype and --dtype, parsed: (shapes, input dtypes, cast dtype), None where not given."""
    from ..inputs import parse_dtype, parse_float_dtype, parse_shape

    shapes = [parse_shape(s) for s in input_shape] if input_shape else None
    input_dtypes = [parse_dtype(d) for d in input_dtype] if input_dtype else None
    return shapes, input_dtypes, parse_float_dtype(dtype) if dtype else None


@contextlib.contextmanager
def _stdout_for(json_output: bool):
    """With --json, stdout holds the one JSON object: anything else printed meanwhile (the model's own code,
    a library) goes to stderr."""
    if not json_output:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _prepare(
    source: Path,
    arch,
    arch_kwargs,
    state_key,
    allow_pickle,
    stages,
    *,
    fold=True,
    keep_original=False,
    allow_nonfinite=False,
    dtype=None,
):
    from ..pipeline import prepare

    return prepare(
        source,
        arch=arch,
        arch_kwargs=arch_kwargs,
        state_key=state_key,
        allow_pickle=allow_pickle,
        fold=fold,
        keep_original=keep_original,
        allow_nonfinite=allow_nonfinite,
        dtype=dtype,
        progress=stages.reporter(),
    )


def _arch_file(arch: str | None) -> Path | None:
    """The file an --arch path/to/file.py:callable names (an input that no output may replace)."""
    target = (arch or "").rpartition(":")[0]
    return Path(target) if target.endswith(".py") else None


InputShape = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Input shape such as 1,3,224,224; repeat for several inputs. Default: the size the model declares.",
    ),
]
InputDtype = Annotated[
    list[str] | None,
    typer.Option(
        "--input-dtype",
        help="Dtype of each input, in forward's order (one value: all inputs): float32, float16, bfloat16, "
        "float64, int64, int32, bool. Default: the export dtype for every input.",
    ),
]
StaticBatch = Annotated[
    bool,
    typer.Option("--static-batch", help="Fix the batch dimension of the graph written (export's .onnx, bake's .pt2)."),
]
DynamicHW = Annotated[
    bool, typer.Option("--dynamic-hw", help="Make spatial dimensions dynamic too (export's .onnx, bake's .pt2).")
]
InputName = Annotated[
    list[str] | None,
    typer.Option("--input-name", help="Name of each graph input (repeat). Default: forward's parameter names."),
]
ExportDtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Cast the baked model to float16, bfloat16, float32 or float64 (weights computed in float64, rounded "
        "once). Default: the checkpoint's dtype.",
    ),
]

# The int8 verdict's thresholds, in quantize and in verify of an int8 graph (defaults: quantize.verdict).
MinSqnr = Annotated[
    float, typer.Option("--min-sqnr", help="int8: least SQNR in dB of each output against the checkpoint's.")
]
MinAgreement = Annotated[
    float,
    typer.Option("--min-agreement", help="int8: least share of samples whose top-1 class agrees ([N, C] outputs)."),
]
