"""OpenVINO on the CPU: compiled with its own defaults (or --precision), the precision it chose read back."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from ...errors import VerifyInputError, first_line
from ...io.memory import trim_heap
from . import PRECISIONS, RuntimeRun, precision_name

# OpenVINO's element type names for the precisions wsfold asks for or reads back.
_OV_TYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def run(
    path: Path, feeds: list[dict[str, np.ndarray]], *, precision: str | None, graph_dtype: torch.dtype
) -> RuntimeRun:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
        raise VerifyInputError(
            f"OpenVINO cannot load {path} ({_first(exc)}).", "check the graph with --runtime onnxruntime first."
        ) from None
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    used = _OV_TYPES.get(hint, torch.float32)
    if precision is not None and used != PRECISIONS[precision]:
        del compiled
        raise VerifyInputError(
            f"--precision {precision}: OpenVINO on this CPU does not compute in {precision} (it chose {hint}).",
            "use --precision f32, or leave --precision out to verify at the precision OpenVINO picks here.",
        )
    # The graph's own precision bounds what the runtime computes in (a float16 graph run in f32 is still f16).
    effective = max((used, graph_dtype), key=lambda d: torch.finfo(d).eps)
    note = None
    if precision is None and used != torch.float32 and torch.finfo(used).eps > torch.finfo(graph_dtype).eps:
        note = (
            f"OpenVINO ran in {precision_name(used)} here (its default on this CPU); force f32 with --precision f32 "
            "(INFERENCE_PRECISION_HINT)"
        )
    outputs = []
    try:
        for feed in feeds:
            result = compiled(feed)
            outputs.append([np.asarray(result[port]) for port in compiled.outputs])
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
        raise VerifyInputError(
            f"OpenVINO cannot run the graph on these inputs ({_first(exc)}).",
            "fix --input-shape or --inputs to fit the graph.",
        ) from None
    finally:
        del compiled, core
        gc.collect()
        trim_heap()
    return RuntimeRun("openvino", ov.__version__.split("-")[0], effective, outputs, note)


def _first(exc: BaseException) -> str:
    """OpenVINO's messages start with lines of source locations: the last line says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else first_line(exc)
