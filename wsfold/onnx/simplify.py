"""Exact simplifications of an exported graph, one job each: arithmetic with a constant that changes nothing
(x * 1, x + 0, x - 0, x / 1), and shapes computed at run time that do not depend on the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .store import to_array

_IDENTITY = {"Mul": (1.0, (0, 1)), "Add": (0.0, (0, 1)), "Sub": (0.0, (1,)), "Div": (1.0, (1,))}
_SMALL = 1 << 16  # elements: an identity operand is a per-channel affine, never a weight


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Each value's shape as onnx's shape inference sees it (dims: int, a symbol such as the batch, or None)."""
    # data_prop: shape arithmetic (Shape, Slice, Concat) is evaluated symbolically, so a Reshape whose target it
    # computes gets an output shape.
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            ]
    for init in proto.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def drop_identity_arithmetic(proto: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Remove Mul/Div by a constant of ones and Add/Sub of a constant of zeros where the other operand already has
    the output's shape (the constant broadcasts without growing it): exact, as x * 1 == x (a GroupNorm's affine at
    its initial values, left by every random-init or freshly converted model). Returns how many went."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    shapes = None
    removed = []
    for node in graph.node:
        if node.op_type not in _IDENTITY or len(node.input) != 2 or node.output[0] in outputs:
            continue
        neutral, positions = _IDENTITY[node.op_type]
        for pos in positions:
            const, other = node.input[pos], node.input[1 - pos]
            tensor = inits.get(const)
            if tensor is None or other in inits or int(np.prod(tensor.dims, dtype=np.int64)) > _SMALL:
                continue
            value = to_array(tensor, base_dir)
            if value.dtype.kind != "f" or not np.all(value == neutral):
                continue
            shapes = shapes if shapes is not None else _shapes(proto)
            same = shapes.get(other), shapes.get(node.output[0])
            if same[0] is None or same[0] != same[1] or None in same[0]:
                continue
            _rewire(graph, node.output[0], other)
            removed.append(node)
            break
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def fold_static_shapes(proto: onnx.ModelProto) -> int:
    """A Reshape whose target is computed at run time (Shape, Slice, Concat of the input's shape) while its output's
    shape is static but for one dim (the batch) gets that shape as a constant target (0 for the batch where the
    input has it at the same place, so that shape inference keeps its name downstream; -1 otherwise). The shape
    arithmetic then computes nothing anyone reads, and goes. Returns how many targets became constant."""
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    shapes = None
    folded = 0
    made: dict[bytes, str] = {}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in inits:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        shapes = shapes if shapes is not None else _shapes(proto)
        dims = shapes.get(node.output[0])
        source = producers.get(node.input[1])
        if (
            source is not None
            and source.op_type == "Shape"
            and all(a.name == "start" and a.i == 0 for a in source.attribute)
        ):
            dims = shapes.get(source.input[0])  # Reshape(x, Shape(y)): y's shape, which inference knows better
        if not dims:
            continue
        unknown = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if len(unknown) > 1 or 0 in dims:
            continue  # two dynamic dims (-1 can stand for one only), or an empty one
        data = shapes.get(node.input[0]) or []
        keep = [i for i in unknown if i < len(data) and isinstance(dims[i], str) and data[i] == dims[i]]
        target = np.array([d if isinstance(d, int) else (0 if i in keep else -1) for i, d in enumerate(dims)])
        key = target.astype(np.int64).tobytes()
        if key not in made:
            made[key] = f"wsfold_shape_{len(made)}"
            graph.initializer.append(numpy_helper.from_array(target.astype(np.int64), made[key]))
        node.input[1] = made[key]
        folded += 1
    drop_dead_nodes(proto)
    return folded


def drop_dead_nodes(proto: onnx.ModelProto) -> int:
    """Nodes whose outputs nothing reads (and that are not graph outputs)."""
    graph = proto.graph
    dropped = 0
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in read for out in n.output)]
        if not dead:
            return dropped
        for node in dead:
            graph.node.remove(node)
        dropped += len(dead)
