"""One module per runtime that runs a graph for verify, behind one small interface (run the feeds, say how)."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import VerifyInputError

# --runtime name -> module in this package ("" for a runtime that has no runner in this version).
RUNTIMES = {"onnxruntime": "ort", "openvino": "openvino", "tensorrt": ""}
# --precision name -> the dtype the runtime computes in.
PRECISIONS = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


def precision_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class RuntimeRun:
    """What one runtime computed on every feed, and at which precision it really computed (read back from the
    runtime, not assumed)."""

    runtime: str
    version: str
    precision: torch.dtype
    outputs: list[list[np.ndarray]]
    note: str | None = None  # how the precision came about, when it is not the graph's own


def check_runtimes(runtimes: list[str], precision: str | None) -> list[str]:
    """The runtimes asked for, each once, in order; refused before any work (exit 2) when one is unknown, not
    installed, or cannot run here, or the precision is not one wsfold can ask for."""
    names = list(dict.fromkeys(runtimes or ["onnxruntime"]))
    for name in names:
        if name not in RUNTIMES:
            raise VerifyInputError(
                f"--runtime {name!r} is not one of {', '.join(RUNTIMES)}.", "use --runtime onnxruntime or openvino."
            )
        if name == "tensorrt":
            raise VerifyInputError(_tensorrt_absence(), "verify here with --runtime onnxruntime or openvino.")
        if name == "openvino" and importlib.util.find_spec("openvino") is None:
            raise VerifyInputError("--runtime openvino: OpenVINO is not installed.", "pip install 'wsfold[openvino]'.")
    if precision is not None and precision not in PRECISIONS:
        raise VerifyInputError(
            f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}.", "use --precision f32."
        )
    return names


def _tensorrt_absence() -> str:
    """Why --runtime tensorrt cannot run: what is missing here (no runner ships without a machine to run it on)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("no TensorRT (the tensorrt package)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU")
    if missing:
        return f"--runtime tensorrt: this machine has {' and '.join(missing)}."
    return "--runtime tensorrt: this version of wsfold has no TensorRT runner yet."


def run_runtime(
    name: str, path: Path, feeds: list[dict[str, np.ndarray]], *, precision: str | None, graph_dtype: torch.dtype
) -> RuntimeRun:
    """Run the graph at ``path`` on every feed with runtime ``name`` (not onnxruntime's verify session: see
    verification), its session released before this returns."""
    module = importlib.import_module(f".{RUNTIMES[name]}", __name__)
    return module.run(path, feeds, precision=precision, graph_dtype=graph_dtype)
