"""The call into torch.onnx (dynamo or TorchScript): quiet, once-built, its refusals said as the model's."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, brief, first_line
from .trace import _Modeless

_REGISTRIES: dict[Any, Any] = {}  # the dynamo exporter's op registries, built once per process


@contextlib.contextmanager
def _exporter_errors(exporter: str):
    """torch.onnx refusing the model (an op ONNX lacks, control flow it cannot capture) is about the model; a full
    disk or a refused write is the machine's (left for the CLI to say so)."""
    from ..errors import ENVIRONMENT_ERRNOS

    try:
        yield
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except OSError as exc:
        if exc.errno in ENVIRONMENT_ERRNOS:
            raise
        raise _model_refused(exporter, exc) from None
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types
        raise _model_refused(exporter, exc) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _model_refused(exporter: str, exc: BaseException) -> ExportError:
    """The exporter's own wrapper ("Failed to export the model with torch.export ...") says where, its cause says
    why (data-dependent control flow, an unsupported op): name the innermost one."""
    cause = exc
    while cause.__cause__ is not None and cause.__cause__ is not cause:
        cause = cause.__cause__
    text = brief(_ANSI.sub("", first_line(cause)), 300)
    other = "dynamo" if exporter == "torchscript" else "torchscript"
    return ExportError(
        f"torch.onnx ({exporter}) cannot export the model: {type(cause).__name__}: {text}.",
        f"try --exporter {other}, or change the model code it names.",
    )


@contextlib.contextmanager
def _quiet_exporter(notes: list[str]):
    """torch.onnx prints progress to stdout and warns a lot; keep stdout for our own (JSON) output. Tracer
    warnings raised in the model's own code (not torch's) are kept as notes: a traced branch may be wrong."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    torch_dir = str(Path(torch.__file__).parent)
    try:
        # torch.export prints the graph it could not capture to stderr; the error says what went wrong.
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("always")
            yield sink
        for w in caught:
            if issubclass(w.category, torch.jit.TracerWarning) and not str(w.filename).startswith(torch_dir):
                note = (
                    f"tracer warning at {Path(w.filename).name}:{w.lineno}: {str(w.message).split('.')[0]}; run verify"
                )
                if note not in notes:
                    notes.append(note)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _registry_built_once():
    """The dynamo exporter rebuilds its table of ONNX translations on every call: onnxscript re-parses the source
    of ~500 torchlib functions, about 1 s each time on the project's machine. Within our own export calls, build
    it once per opset and process (the table is only read: wsfold registers no custom translations). If torch no
    longer has this hook, nothing changes but the time."""
    try:
        from torch.onnx._internal.exporter import _registration

        owner = _registration.ONNXRegistry
        original = owner.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    owner.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        owner.from_torchlib = original


def _raw_export(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    exporter: str,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    dynamic_hw: bool,
) -> None:
    """torch.onnx.export to ``path``. The dynamo exporter writes the weights to ``path``.data as it goes (never
    a second copy of them in memory); the TorchScript one writes one file (external data only above 2 GB)."""
    if exporter == "torchscript":
        axes: dict[str, dict[int, str]] = {}
        for name, x in zip(input_names, args):
            dims = {0: "batch"} if dynamic_batch else {}
            if dynamic_hw:
                dims.update({d: f"{name}_dim{d}" for d in range(2, x.ndim)})
            if dims:
                axes[name] = dims
        if dynamic_batch:
            axes.update({name: {0: "batch"} for name in output_names})
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes or None,
            do_constant_folding=True,
        )
        return
    dim = torch.export.Dim
    batch = dim("batch") if dynamic_batch else None
    shapes = []
    for i, x in enumerate(args):
        spec: dict[int, Any] = {0: batch} if batch is not None else {}
        if dynamic_hw:
            spec.update({d: dim(f"in{i}_d{d}") for d in range(2, x.ndim)})
        shapes.append(spec or None)
    # A wrapped program module takes ``*args``: torch.export matches that parameter as one tuple.
    dynamic = (tuple(shapes),) if isinstance(model, _Modeless) else tuple(shapes)
    with _registry_built_once():
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic,
            external_data=True,
            optimize=True,
            verbose=False,
        )
