"""Exact simplifications of an exported graph, one job each: arithmetic with a constant that changes nothing
(x * 1, x + 0, x - 0, x / 1), and shapes computed at run time that do not depend on the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .shapes import shapes as value_shapes
from .store import to_array

_IDENTITY = {"Mul": (1.0, (0, 1)), "Add": (0.0, (0, 1)), "Sub": (0.0, (1,)), "Div": (1.0, (1,))}
_SMALL = 1 << 16  # elements: an identity operand is a per-channel affine, never a weight


def _fresh_name(graph: onnx.GraphProto, stem: str) -> str:
    """``stem`` numbered past every initializer, node output and graph input that already takes one of its names."""
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input}
    number = 0
    while f"{stem}_{number}" in taken:
        number += 1
    return f"{stem}_{number}"


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
            shapes = shapes if shapes is not None else value_shapes(proto)
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
        shapes = shapes if shapes is not None else value_shapes(proto)
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
            # A fresh name: an earlier round's targets are initializers already.
            made[key] = _fresh_name(graph, "wsfold_shape")
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


def fold_known_shapes(proto: onnx.ModelProto) -> int:
    """A Shape whose input's dims are all known (to onnx's inference, or to onnxruntime's where trusted: see
    shapes.py), or a Gather or Slice of a Shape that picks only known dims (x.shape[1], x.shape[-2:]), becomes a
    constant. What computed on it alone is folded after, by ONNX's reference evaluator (fold_constant_nodes), so
    every value is computed as ONNX computes it.

    Vectors built of shape elements (Shape, Gather, Slice, Unsqueeze, Concat) are followed element by element, an
    unknown element being a dim, never negative: ``Where(Equal(v, -1), 1, v)``, what TorchScript writes for
    ``expand(b, -1, -1)`` and einops for its repeats, compares a dim with -1 and so is known, and becomes v with
    its -1 pieces replaced. Returns how many nodes were folded or replaced."""
    graph = proto.graph
    if not any(node.op_type == "Shape" for node in graph.node):
        return 0  # nothing reads a shape
    known = value_shapes(proto)
    inits = {t.name: t for t in graph.initializer}
    outputs = _protected(graph)
    producers = {out: node for node in graph.node for out in node.output}
    # Integer vectors (or scalars) whose elements are known (int) or are a dim (None): never negative.
    partial: dict[str, tuple[list[int | None], bool]] = {}
    folded_nodes = []
    changed = 0

    def constant(node: onnx.NodeProto, value, dtype=np.int64, scalar: bool = False) -> None:
        array = np.array(value[0] if scalar else value, dtype=dtype)
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        inits[node.output[0]] = graph.initializer[-1]
        folded_nodes.append(node)

    def ints(name: str) -> list[int] | None:
        tensor = inits.get(name)
        if tensor is None or tensor.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            return None
        return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]

    def vector(name: str) -> tuple[list[int | None], bool] | None:
        """``name``'s elements and whether it is a scalar: followed, or a constant of at most 64 integers."""
        if name in partial:
            return partial[name]
        values = ints(name)
        if values is None or len(values) > 64:
            return None
        return values, list(inits[name].dims) == []

    for node in graph.node:
        if not node.output or node.output[0] in outputs:
            continue
        picked: list[int | None] | None = None
        scalar = False
        if node.op_type == "Shape":
            dims = known.get(node.input[0])
            if dims is None:
                continue
            begin = next((a.i for a in node.attribute if a.name == "start"), 0)
            stop = next((a.i for a in node.attribute if a.name == "end"), None)
            picked = [d if isinstance(d, int) else None for d in dims[slice(begin, stop)]]
        elif node.op_type in ("Gather", "Slice") and node.input[0] in partial and not partial[node.input[0]][1]:
            dims = partial[node.input[0]][0]
            if node.op_type == "Gather":
                at = ints(node.input[1])
                if at is None or any(a.name == "axis" and a.i != 0 for a in node.attribute):
                    continue
                if any(not -len(dims) <= i < len(dims) for i in at):
                    continue
                picked = [dims[i] for i in at]
                scalar = list(inits[node.input[1]].dims) == []
            else:
                bounds = [ints(name) if name else None for name in list(node.input[1:]) + [""] * 4][:4]
                starts, ends, axes, steps = bounds
                if starts is None or ends is None or len(starts) != 1 or axes not in (None, [0], [-1]):
                    continue
                if (len(node.input) > 3 and node.input[3] and axes is None) or (
                    len(node.input) > 4 and node.input[4] and steps is None
                ):
                    continue  # axes or steps computed at run time
                picked = [dims[i] for i in np.arange(len(dims))[slice(starts[0], ends[0], (steps or [1])[0])]]
        elif node.op_type == "Unsqueeze" and node.input[0] in partial and partial[node.input[0]][1]:
            if len(node.input) < 2 or ints(node.input[1]) not in ([0], [-1]):
                continue
            picked = partial[node.input[0]][0]
        elif node.op_type == "Reshape" and node.input[0] in partial and not partial[node.input[0]][1]:
            if ints(node.input[1]) not in ([-1], [len(partial[node.input[0]][0])]):
                continue  # only a vector reshaped to itself (TorchScript writes one before expand's check)
            picked = partial[node.input[0]][0]
        elif node.op_type == "Concat" and all(a.i == 0 for a in node.attribute if a.name == "axis"):
            pieces = [vector(name) for name in node.input]
            if any(p is None or p[1] for p in pieces) or not any(name in partial for name in node.input):
                continue
            picked = [v for p in pieces for v in p[0]]
        elif node.op_type == "Equal":
            a, b = vector(node.input[0]), vector(node.input[1])
            if a is None or b is None or not (node.input[0] in partial or node.input[1] in partial):
                continue
            (left, left_scalar), (right, right_scalar) = a, b
            if len(left) != len(right):
                left, right = (left * len(right), right) if len(left) == 1 else (left, right * len(left))
            if len(left) != len(right):
                continue
            decided = []
            for x, y in zip(left, right):
                if x is not None and y is not None:
                    decided.append(x == y)
                elif (x is None and y is not None and y < 0) or (y is None and x is not None and x < 0):
                    decided.append(False)  # a dim is never negative
                else:
                    break
            else:
                constant(node, decided, dtype=np.bool_, scalar=left_scalar and right_scalar)
            continue
        elif node.op_type == "Where" and node.input[0] in inits and node.input[2] in partial:
            changed += _where_on_a_vector(graph, node, inits, partial, producers, vector)
            continue
        if picked is None:
            continue
        if all(v is not None for v in picked):
            constant(node, picked, scalar=scalar)
        else:
            partial[node.output[0]] = (picked, scalar)
    for node in folded_nodes:
        graph.node.remove(node)
    if folded_nodes or changed:
        drop_dead_nodes(proto)
    return len(folded_nodes) + changed


def _where_on_a_vector(graph, node, inits, partial, producers, vector) -> int:
    """Where(known condition, constant x, v) over a vector v concatenated from pieces: the Where becomes that
    Concat with each piece the condition takes from x replaced by x's values there (it must lie whole on such
    positions). Returns 1 when it did."""
    condition = numpy_helper.to_array(inits[node.input[0]]).reshape(-1)
    taken = vector(node.input[1])
    values, _ = partial[node.input[2]]
    concat = producers.get(node.input[2])
    if concat is not None and concat.op_type == "Reshape" and concat.input[0] in partial:
        concat = producers.get(concat.input[0])  # a vector reshaped to itself: its pieces are the Concat's
    if taken is None or concat is None or concat.op_type != "Concat" or condition.dtype != np.bool_:
        return 0
    fill = taken[0] * len(values) if len(taken[0]) == 1 else taken[0]
    if len(condition) != len(values) or len(fill) != len(values) or None in fill:
        return 0
    if any(name in inits and inits[name].data_type != onnx.TensorProto.INT64 for name in concat.input):
        return 0  # the pieces written here are int64
    pieces, at = [], 0
    for name in concat.input:
        size = len(vector(name)[0])
        chosen = condition[at : at + size]
        if chosen.all():
            replacement = _fresh_name(graph, f"{node.output[0]}_piece")
            graph.initializer.append(
                numpy_helper.from_array(np.array(fill[at : at + size], dtype=np.int64), replacement)
            )
            inits[replacement] = graph.initializer[-1]
            pieces.append(replacement)
        elif not chosen.any():
            pieces.append(name)
        else:
            return 0  # the condition splits a piece
        at += size
    del node.input[:]
    node.input.extend(pieces)
    node.op_type = "Concat"
    del node.attribute[:]
    node.attribute.append(onnx.helper.make_attribute("axis", 0))
    partial[node.output[0]] = ([f if c else v for c, f, v in zip(condition, fill, values)], False)
    return 1


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
        name = _fresh_name(graph, f"{outer.output[0]}_axes")
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
                shapes, types = value_shapes(proto), _elem_types(proto)
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
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except onnx.shape_inference.InferenceError:
        inferred = proto  # shapes that contradict each other: onnx.checker says so when the graph is written
    types = {t.name: t.data_type for t in proto.graph.initializer}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types
