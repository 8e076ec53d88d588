"""onnxruntime: a CPU session at the optimization level asked, and the graph run on every feed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import VerifyInputError, first_line
from ...io.memory import trim_heap
from ..feeds import _check_feed

ORT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def ort_session(path: Path, level: str = "all"):
    import onnxruntime as ort
    from google.protobuf.message import DecodeError

    from ...onnx.store import load_without_weights

    def options():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
        opts.log_severity_level = 4  # fatal only: an error is reported once, by us, on one line
        return opts

    # The graph's structure, its weights read by onnxruntime from where they lie in the file (each embedded tensor's
    # bytes given as external data at its offset in the file itself): the same graph and the same bytes, without
    # the whole file read into memory and parsed with its weights (a session peaked at 2.6x the file's size that
    # way, 1.9x this way). The file is named by its real path: onnxruntime refuses data behind a link that leads
    # out of the folder. A graph with a data file of its own is left to onnxruntime, which finds that file beside
    # PATH as given (and holds no weights in the graph to begin with).
    real = Path(path).resolve()
    try:
        structure = load_without_weights(real)
        if any(
            entry.key == "location" and entry.value != real.name
            for tensor in structure.graph.initializer
            for entry in tensor.external_data
        ):
            structure = None
    except (OSError, ValueError, DecodeError):
        structure = None  # not a protobuf this reader follows: onnxruntime reads the file itself and says why
    if structure is not None:
        opts = options()
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(real.parent))
        try:
            return ort.InferenceSession(structure.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - an onnxruntime without that setting: it reads the file itself, below
            pass
    try:
        return ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        hint = "re-export it with `wsfold export`."
        if "NOT_IMPLEMENTED" in str(exc):
            hint = (
                "the graph uses an op at a type onnxruntime's CPU provider does not run (a float64 Conv?): "
                "re-export it with `wsfold export --dtype float32`."
            )
        raise VerifyInputError(f"onnxruntime cannot load {path} ({first_line(exc)}).", hint) from None


def _run_graph(session, feeds) -> list[list[np.ndarray]]:
    """The graph's outputs for every feed."""
    outputs = []
    for feed in feeds:
        _check_feed(session, feed)
        try:
            outputs.append(session.run(None, feed))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise VerifyInputError(
                f"onnxruntime cannot run the graph on these inputs ({first_line(exc)}).",
                "fix --input-shape or --inputs to fit the graph (it may be another model's).",
            ) from None
    return outputs


def graph_metadata(session) -> dict[str, str]:
    """The graph's metadata_props (what wsfold export stamped), from the session that loaded it (loading the
    file again would read a one-file graph's weights once more)."""
    return dict(session.get_modelmeta().custom_metadata_map)


def _graph_float_dtype(session, meta: dict[str, str]) -> torch.dtype | None:
    """The precision the graph's weights have: what export --dtype recorded (bfloat16 is written as float32),
    else the graph's floating input or output type."""
    recorded = getattr(torch, meta.get("wsfold_dtype", ""), None)
    if isinstance(recorded, torch.dtype) and recorded.is_floating_point:
        return recorded
    names = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}
    for spec in [*session.get_inputs(), *session.get_outputs()]:
        if spec.type in names:
            return names[spec.type]
    return None


def run(
    path: Path,
    feeds: list[dict[str, np.ndarray]],
    *,
    precision: str | None,
    graph_dtype: torch.dtype,
    level: str = "all",
):
    """The graph run on every feed in a session of its own (released before this returns)."""
    import onnxruntime as ort

    from . import RuntimeRun

    check_precision(precision, graph_dtype)
    session = ort_session(path, level)
    try:
        outputs = _run_graph(session, feeds)
    finally:
        del session
        trim_heap()
    return RuntimeRun("onnxruntime", ort.__version__, graph_dtype, outputs)


def check_precision(precision: str | None, graph_dtype: torch.dtype) -> None:
    """onnxruntime's CPU provider computes a graph in the graph's own precision: nothing else can be asked."""
    from . import PRECISIONS, precision_name

    if precision is not None and PRECISIONS[precision] != graph_dtype:
        raise VerifyInputError(
            f"--precision {precision}: onnxruntime's CPU provider computes this graph in "
            f"{precision_name(graph_dtype)} only.",
            "ask for another precision with --runtime openvino alone, or leave --precision out.",
        )
