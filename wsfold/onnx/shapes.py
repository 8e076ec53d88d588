"""What the graph passes know of each value's shape: onnx's shape inference, and onnxruntime's symbolic one where
its result can be trusted.

onnxruntime's symbolic shape inference sees further than onnx's (through a Pad whose sizes were computed from
shapes), but it was written to size buffers, not to fold graphs: it floors every Div (float or negative too),
passes a float-to-int Cast's value on unchanged, truncates float products. So its dims are taken only for values
whose every shape-setting input (a Reshape's target, a Pad's sizes, a Slice's bounds...) is a constant or an
integer computed from trusted dims by ops it computes as ONNX does."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .store import is_external

_INT = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
# The inputs (by position) whose values set an op's output shape. An op not listed: every integer input but the
# first. Ops whose output shape depends on their data are never trusted.
_SHAPE_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Pad": (1, 2, 3),
    "Slice": (1, 2, 3, 4),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "Gather": (),
    "GatherElements": (),
    "Where": (),
    "Equal": (),
}
_DATA_DEPENDENT = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "If", "Loop", "Scan", "StringSplit"}
# Integer arithmetic it computes as ONNX does (Div: only on non-negative operands, where flooring is truncating).
_EXACT = {
    "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Identity", "Reshape", "Cast",
    "Add", "Sub", "Mul", "Neg", "Max", "Min", "Equal", "Where", "Div",
}  # fmt: skip


def symbolic(proto: onnx.ModelProto):
    """onnxruntime's symbolic shape inference run over a copy of ``proto``, or None where it cannot run."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # an onnxruntime build without its tools: onnx's own inference still serves
        return None
    engine = SymbolicShapeInference(2**31 - 1, False, False, 0)  # int_max, no auto_merge, no rank guessing
    # It reads an initializer's values where an op might compute on a shape (a Mul by a weight): those on disk are
    # given to it as inputs of their shape instead, as a weight never holds a shape.
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    graph = light.graph
    for tensor in [t for t in graph.initializer if is_external(t)]:
        graph.initializer.remove(tensor)
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    # A Resize's scales are floats, and floor(1.0*batch) is not the symbol batch to it: an upsampled tensor would
    # no longer match its skip connection. Scales that are whole numbers are handed to it as the integers they are.
    start = {}
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    for node in graph.node:
        if node.op_type == "Resize" and len(node.input) > 2 and node.input[2] in inits:
            scales = numpy_helper.to_array(inits[node.input[2]])
            if readers[node.input[2]] == {"Resize"} and scales.ndim == 1 and np.all(scales == np.round(scales)):
                start[node.input[2]] = [int(v) for v in scales]
    try:
        engine._preprocess(light)
        while engine.run_:
            engine._infer_impl(dict(start))
        engine._update_output_from_vi()
    except Exception:  # noqa: BLE001 - an op it does not know stops it; what it got so far is kept
        pass
    return engine if isinstance(getattr(engine, "known_vi_", None), dict) else None


def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    t = value.type.tensor_type
    if not t.HasField("shape") or not all(d.HasField("dim_value") or d.dim_param for d in t.shape.dim):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]


def _integers(value) -> list[int] | None:
    items = value if isinstance(value, list) else [value]
    if all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) or getattr(v, "is_Integer", False) for v in items
    ):
        return [int(v) for v in items]
    return None


def trusted_dims(proto: onnx.ModelProto) -> dict[str, list[int | str]]:
    """The dims onnxruntime's symbolic inference gives each value whose shape it computed from trusted sources
    alone (see the module's docstring); nothing for the others."""
    engine = symbolic(proto)
    if engine is None:
        return {}
    graph = proto.graph
    known = engine.known_vi_
    types = {name: v.type.tensor_type.elem_type for name, v in known.items()}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    dims = {i.name for i in graph.input} | {t.name for t in graph.initializer} | constants
    values = set(constants)  # values it holds exactly
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or node.op_type in _DATA_DEPENDENT or node.domain not in ("", "ai.onnx"):
            continue
        params = _SHAPE_INPUTS.get(node.op_type)
        if params is None:
            params = tuple(i for i, name in enumerate(node.input) if i and name and types.get(name) in _INT)
        setting = [node.input[i] for i in params if i < len(node.input) and node.input[i]]
        if all(i in dims for i in inputs) and all(i in values for i in setting):
            dims.update(node.output)
        if node.op_type == "Shape":
            if node.input[0] in dims:
                values.add(node.output[0])
            continue
        out_types = _INT | {onnx.TensorProto.BOOL} if node.op_type == "Equal" else _INT
        if node.op_type not in _EXACT or len(node.output) != 1 or types.get(node.output[0]) not in out_types:
            continue
        ints = [i for i in inputs if not (node.op_type == "Where" and i == node.input[0])]
        if not all(i in values and types.get(i) in _INT for i in ints) or (
            node.op_type == "Where" and node.input[0] not in values
        ):
            continue
        if node.op_type == "Div":
            operands = [_integers(engine.sympy_data_.get(i)) if i in engine.sympy_data_ else None for i in inputs]
            if None in operands or min(operands[0] + operands[1]) < 0 or 0 in operands[1]:
                continue
        values.add(node.output[0])
    return {name: d for name in dims if name in known and (d := _dims(known[name])) is not None}


def shapes(proto: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Each value's shape: onnx's shape inference (dims: int, a symbol such as the batch, or None), completed by
    onnxruntime's where that is trusted."""
    # data_prop: shape arithmetic (Shape, Slice, Concat) is evaluated symbolically, so a Reshape whose target it
    # computes gets an output shape.
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except onnx.shape_inference.InferenceError:
        inferred = proto  # a graph whose shapes contradict each other: onnx.checker says so when it is written
    found: dict[str, list[int | str | None]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            found[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    found.update({name: list(dims) for name, dims in trusted_dims(proto).items()})
    for init in proto.graph.initializer:
        found[init.name] = list(init.dims)
    return found
