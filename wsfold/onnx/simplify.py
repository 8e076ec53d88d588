"""Exact simplifications of an exported graph, one job each: arithmetic with a constant that changes nothing
(x * 1, x + 0, x - 0, x / 1), and shapes computed at run time that do not depend on the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .store import is_external, to_array

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
    engine = _symbolic(proto)  # onnxruntime's sees further (through a computed Pad): where it knows, it wins
    if engine is not None:
        for name, value in engine.known_vi_.items():
            t = value.type.tensor_type
            if t.HasField("shape") and all(d.HasField("dim_value") or d.dim_param for d in t.shape.dim):
                shapes[name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
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
    outputs = _protected(graph)
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


def _subgraph_reads(nodes) -> set[str]:
    """Every name read inside the subgraphs (If, Loop, Scan bodies) of ``nodes``, at any depth: a value of the
    main graph that a body reads from the outer scope is read, though no main-graph node lists it."""
    reads: set[str] = set()
    for node in nodes:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                reads |= {name for inner in body.node for name in inner.input}
                reads |= _subgraph_reads(body.node)
    return reads


def _protected(graph: onnx.GraphProto) -> set[str]:
    """Values no pass may rename or remove: the graph's outputs, and what a subgraph reads from the outer scope."""
    return {o.name for o in graph.output} | _subgraph_reads(graph.node)


def drop_dead_nodes(proto: onnx.ModelProto) -> int:
    """Nodes whose outputs nothing reads (and that are not graph outputs)."""
    graph = proto.graph
    dropped = 0
    protected = _protected(graph)
    while True:
        read = {name for node in graph.node for name in node.input} | protected
        dead = [n for n in graph.node if not any(out in read for out in n.output)]
        if not dead:
            return dropped
        for node in dead:
            graph.node.remove(node)
        dropped += len(dead)


_INTEGER_TYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


def _symbolic(proto: onnx.ModelProto):
    """onnxruntime's symbolic shape inference run over ``proto`` (a copy: ``proto`` is not changed), or None where
    it cannot run. Unlike onnx's, it carries the batch through a Pad or Slice whose sizes were computed, and keeps
    the value of every shape tensor it meets (Shape, Gather, Concat, arithmetic on them)."""
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
    external = [t for t in graph.initializer if is_external(t)]
    for tensor in external:
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
    except Exception:  # noqa: BLE001 - an op it does not know stops it; what it got so far is still right
        pass
    return engine if isinstance(getattr(engine, "sympy_data_", None), dict) else None


def _plain_integers(value) -> np.ndarray | None:
    """``value`` (an int, a sympy Integer, or a list of them) as an array, or None if any part is a symbol."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            return None
        if isinstance(item, (int, np.integer)):
            out.append(int(item))
            continue
        if getattr(item, "is_Integer", False):
            out.append(int(item))
            continue
        return None
    return np.array(out if isinstance(value, list) else out[0], dtype=np.int64)


def fold_known_shapes(proto: onnx.ModelProto) -> int:
    """Every integer tensor computed from shapes (Shape -> Gather -> Unsqueeze -> Concat, a head size Div'ed out
    of a Shape) whose value onnxruntime's symbolic shape inference knows exactly, that is whatever does not depend
    on the batch or another dynamic size, becomes a constant, and what computed it goes. Returns how many tensors
    became constants."""
    graph = proto.graph
    if not any(node.op_type in ("Shape", "Size") for node in graph.node):
        return 0  # nothing reads a shape: what is computed from constants alone was folded already
    engine = _symbolic(proto)
    if engine is None:
        return 0
    known = engine.sympy_data_
    infos = {v.name: v.type.tensor_type for v in engine.out_mp_.graph.value_info}
    inits = {t.name for t in graph.initializer}
    outputs = _protected(graph)
    made = 0
    folded_nodes = []
    for node in graph.node:
        if node.op_type == "Constant" or len(node.output) != 1:
            continue
        for name in node.output:
            if name not in known or name in inits or name in outputs or name not in infos:
                continue
            info = infos[name]
            if info.elem_type not in _INTEGER_TYPES or not info.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in info.shape.dim]
            value = _plain_integers(known[name])
            if value is None or None in dims or list(value.shape) != dims:
                continue
            graph.initializer.append(numpy_helper.from_array(value.astype(_INTEGER_TYPES[info.elem_type]), name))
            inits.add(name)
            folded_nodes.append(node)
            made += 1
    for node in folded_nodes:
        graph.node.remove(node)
    if made:
        drop_dead_nodes(proto)
    return made


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _int_attr(node: onnx.NodeProto, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _axes(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    """A Squeeze's or Unsqueeze's constant axes (an input since opset 13, an attribute before), or None."""
    if len(node.input) > 1 and node.input[1] in inits:
        return [int(v) for v in numpy_helper.to_array(inits[node.input[1]]).reshape(-1)]
    return _int_attr(node, "axes") if len(node.input) == 1 else None


def merge_unsqueezes(proto: onnx.ModelProto) -> int:
    """Unsqueeze(Unsqueeze(x, a), b), the inner one read by the outer alone, becomes one Unsqueeze adding both sets
    of axes (x[:, :, None, None] written by TorchScript as two). Only non-negative constant axes. Returns how many
    Unsqueezes went."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = _protected(graph)
    producers = {out: node for node in graph.node for out in node.output}
    readers = _readers(graph)

    merged = 0
    for outer in list(graph.node):
        if outer.op_type != "Unsqueeze":
            continue
        inner = producers.get(outer.input[0])
        if inner is None or inner.op_type != "Unsqueeze" or inner.output[0] in outputs:
            continue
        if len(readers.get(inner.output[0], [])) != 1 or len(outer.input) < 2:
            continue
        first, second = _axes(inner, inits), _axes(outer, inits)
        if not first or not second or min(first + second) < 0:
            continue
        rank = max(max(first), max(second)) + len(first) + len(second) + 1  # large enough to place them all
        # The result's positions: second's are new; of the others, in order, first's are the inner's new ones.
        rest = [i for i in range(rank) if i not in second]
        combined = sorted(set(second) | {rest[a] for a in first})
        name = f"{outer.output[0]}_axes"
        graph.initializer.append(numpy_helper.from_array(np.array(combined, dtype=np.int64), name))
        inits[name] = graph.initializer[-1]
        outer.input[0], outer.input[1] = inner.input[0], name
        producers[outer.output[0]] = outer
        graph.node.remove(inner)
        merged += 1
    return merged


def fuse_pad_into_conv(proto: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """A constant zero Pad of the spatial dims read by Convs alone becomes those Convs' own padding, as
    onnxruntime's PadFusion would do at every session start (a TF-SAME stride-2 conv's asymmetric pad). Exact: a
    Conv pads with zeros. A Pad before a MaxPool is another matter (see guard_pad_maxpool) and stays. Returns how
    many Pads went."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = _protected(graph)
    readers = _readers(graph)
    fused = 0
    for pad in list(graph.node):
        if pad.op_type != "Pad" or pad.output[0] in outputs or len(pad.input) < 2 or pad.input[1] not in inits:
            continue
        if any(a.name == "mode" and a.s not in (b"", b"constant") for a in pad.attribute):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # axes given: rare, and the pads would need placing
        if len(pad.input) > 2 and pad.input[2]:
            if pad.input[2] not in inits or to_array(inits[pad.input[2]], base_dir).reshape(-1).tolist() != [0]:
                continue
        convs = readers.get(pad.output[0], [])
        if not convs or any(c.op_type != "Conv" or list(c.input).index(pad.output[0]) != 0 for c in convs):
            continue
        if any(c.input[1:].count(pad.output[0]) for c in convs):
            continue
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for c in convs for a in c.attribute):
            continue
        pads = [int(v) for v in to_array(inits[pad.input[1]], base_dir).reshape(-1)]
        rank = len(pads) // 2
        if rank < 3 or min(pads) < 0 or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            continue
        extra = pads[2:rank] + pads[rank + 2 :]
        for conv in convs:
            own = _int_attr(conv, "pads") or [0] * len(extra)
            if len(own) != len(extra):
                break
        else:
            for conv in convs:
                own = _int_attr(conv, "pads") or [0] * len(extra)
                for a in list(conv.attribute):
                    if a.name == "pads":
                        conv.attribute.remove(a)
                conv.attribute.append(onnx.helper.make_attribute("pads", [x + y for x, y in zip(own, extra)]))
                conv.input[0] = pad.input[0]
            graph.node.remove(pad)
            fused += 1
    return fused


def drop_no_ops(proto: onnx.ModelProto) -> int:
    """Nodes that hand their input on unchanged: Identity, a Cast to the type it already has, a Reshape to the shape
    it already has (cls_token.expand's size vector, reshaped to its own length by TorchScript), a Squeeze of what an
    Unsqueeze of the same axes made, or the other way round (a Squeeze with axes only removes dims of size 1, which
    the Unsqueeze puts back). Shapes compared are known to shape inference: dims that are numbers, or the same
    symbol. Returns how many went."""
    graph = proto.graph
    outputs = _protected(graph)
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    opposite = {"Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}
    shapes, types = None, None
    dropped = []
    for node in graph.node:
        if node.output[0] in outputs or not node.input:
            continue
        if node.op_type in opposite:
            first = producers.get(node.input[0])
            if first is None or first.op_type != opposite[node.op_type]:
                continue
            axes, back = _axes(first, inits), _axes(node, inits)
            if not axes or back is None or sorted(axes) != sorted(back):
                continue
            _rewire(graph, node.output[0], first.input[0])
            dropped.append(node)
            continue
        if node.op_type not in ("Identity", "Cast", "Reshape"):
            continue
        if node.op_type != "Identity":
            if shapes is None:
                shapes, types = _shapes(proto), _elem_types(proto)
            if node.op_type == "Cast":
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if to is None or types.get(node.input[0]) != to:
                    continue
            else:
                before, after = shapes.get(node.input[0]), shapes.get(node.output[0])
                if before is None or before != after or None in before:
                    continue
        _rewire(graph, node.output[0], node.input[0])
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    if dropped:
        drop_dead_nodes(proto)
    return len(dropped)


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    types = {t.name: t.data_type for t in proto.graph.initializer}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types
