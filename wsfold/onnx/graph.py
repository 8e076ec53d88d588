"""Small passes over an ONNX ModelProto, each one job: audit, de-duplicate weights, avoid a runtime miscompile."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .store import external_length, is_external, read_bytes, to_array

WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,)}
# Arithmetic that weight standardization leaves when it is not folded.
WS_OPS = {
    "ReduceMean",
    "BatchNormalization",
    "Sqrt",
    "Div",
    "Sub",
    "Mul",
    "Pow",
    "ReduceSumSquare",
    "Reciprocal",
    "Add",
}


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return names


def _name(node: onnx.NodeProto) -> str:
    return repr(node.name or node.output[0])


def audit_graph(model: onnx.ModelProto) -> list[str]:
    """Problems that make a graph undeployable as wsfold promises: a weight that is not an initializer, or
    arithmetic computed from initializers alone (weight standardization left in the graph)."""
    graph = model.graph
    inits = {init.name for init in graph.initializer}
    constants = _constants(graph)
    problems = []
    for node in graph.node:
        for idx in WEIGHT_OPS.get(node.op_type, ()):
            if len(node.input) > idx and node.input[idx] not in inits:
                problems.append(
                    f"{node.op_type} node {_name(node)}: weight {node.input[idx]!r} is computed, not an initializer"
                )
        if (
            node.op_type == "MatMul"
            and any(i in constants for i in node.input)
            and not any(i in inits for i in node.input)
        ):
            problems.append(
                f"MatMul node {node.name or node.output[0]!r}: weight input is computed, not an initializer"
            )

    training_bn = [
        n
        for n in graph.node
        if n.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in n.attribute)
    ]
    problems += [f"BatchNormalization node {n.name!r} is in training mode" for n in training_bn]
    for node in constant_only_nodes(model):
        what = "unfolded weight arithmetic" if node.op_type in WS_OPS else "a constant subgraph"
        problems.append(f"{node.op_type} node {_name(node)} computes on constants alone ({what})")
    return problems


def dedupe_initializers(model: onnx.ModelProto, base_dir: Path | None = None, min_bytes: int = 1024) -> int:
    """Point every use of a byte-identical initializer at one copy; return how many copies were dropped.
    External initializers are read one at a time from ``base_dir``."""
    graph = model.graph
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        size = external_length(init, base_dir) if is_external(init) else None
        if size is not None and size < min_bytes:
            keep.append(init)
            continue
        raw = read_bytes(init, base_dir)
        if len(raw) < min_bytes:
            keep.append(init)
            continue
        key = (init.data_type, tuple(init.dims), hashlib.sha256(raw).digest())
        del raw
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
            keep.append(init)
    if not rename:
        return 0
    graph_inputs = {i.name for i in graph.input}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in _all_nodes(graph):
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for name in rename:
        if name in graph_inputs:
            kept = [i for i in graph.input if i.name != name]
            del graph.input[:]
            graph.input.extend(kept)
    return len(rename)


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


def guard_pad_maxpool(model: onnx.ModelProto, base_dir: Path | None = None) -> list[str]:
    """Stop onnxruntime fusing a zero Pad into the MaxPool after it.

    The fused MaxPool pads with -inf, so a window holding only negative values (TF-style stems: conv, Pad(0),
    MaxPool) changes its result. onnxruntime fuses only when every byte of the pad value is zero; padding with
    -0.0 is numerically the same and is left alone. Returns the names of the Pad nodes changed.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {init.name: init for init in graph.initializer}
    changed = []
    for node in list(graph.node):
        if node.op_type != "Pad" or not any(c.op_type == "MaxPool" for c in consumers.get(node.output[0], [])):
            continue
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        if mode != "constant":
            continue
        if len(node.input) > 2 and node.input[2]:
            value_name = node.input[2]
            if value_name in inits:
                value = to_array(inits[value_name], base_dir)
            else:
                const = next((n for n in graph.node if n.op_type == "Constant" and n.output[0] == value_name), None)
                if const is None:
                    continue
                value = numpy_helper.to_array(next(a.t for a in const.attribute if a.name == "value"))
            if value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
                continue
            dtype = value.dtype
        else:
            dtype = _elem_dtype(model, node.input[0])
            if dtype is None:
                continue
            while len(node.input) < 2:
                node.input.append("")
        name = f"{node.name or node.output[0]}_neg_zero"
        graph.initializer.append(numpy_helper.from_array(np.array(-0.0, dtype=dtype), name))
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)
        changed.append(node.name or node.output[0])
    return changed


def _elem_dtype(model: onnx.ModelProto, value_name: str):
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.name == value_name and vi.type.tensor_type.elem_type:
            return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort
        return None
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        if vi.name == value_name and vi.type.tensor_type.elem_type:
            return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return None


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers and Constant nodes that nothing reads (left behind by the other passes)."""
    graph = model.graph
    used = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    nodes = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    dropped = len(graph.initializer) - len(keep) + len(graph.node) - len(nodes)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.node[:]
        graph.node.extend(nodes)
    return dropped


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for node in _all_nodes(model.graph) if node.op_type == op_type)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the TorchScript exporter's constant subgraphs (pad construction, shape arithmetic) with onnxscript's
    constant folder, drop dead nodes, and lift the resulting Constant nodes into initializers.

    onnxscript.optimizer.optimize would also run its pattern rewriter: on ResNetV2-50 that costs ~1.2 s of a
    ~4 s export and removes one node more, so it is left out."""
    import onnxscript.optimizer
    from onnxscript import ir

    graph = ir.serde.deserialize_model(model)
    onnxscript.optimizer.fold_constants(graph)
    onnxscript.optimizer.remove_unused_nodes(graph)
    model = ir.serde.serialize_model(graph)
    kept = []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        lift = value is not None and value.type == onnx.AttributeProto.TENSOR and len(node.attribute) == 1
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and lift:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


# A constant subgraph whose result would be larger than this is left alone (and the audit names it).
MAX_FOLDED_BYTES = 64 << 20


def fold_constant_nodes(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Evaluate every node whose inputs are all constants (the TorchScript exporter's pad construction:
    ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast) with ONNX's reference
    evaluator, and store its outputs as initializers. Returns the number of nodes folded."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values: dict[str, onnx.TensorProto] = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    kept, folded = [], 0
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foldable = (
            node.op_type != "Constant"
            and node.domain in ("", "ai.onnx")
            and inputs
            and all(i in values for i in inputs)
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        )
        if foldable:
            try:
                feeds = {i: to_array(values[i], base_dir) for i in inputs}
                single = onnx.helper.make_model(
                    onnx.helper.make_graph(
                        [node],
                        "fold",
                        [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in inputs],
                        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
                    ),
                    opset_imports=[onnx.helper.make_opsetid("", opset)],
                )
                results = ReferenceEvaluator(single).run(None, feeds)
            except Exception:  # noqa: BLE001 - an op the reference evaluator cannot run: leave it to the audit
                results = None
            if results is not None and sum(np.asarray(r).nbytes for r in results) <= MAX_FOLDED_BYTES:
                for name, value in zip(node.output, results):
                    tensor = numpy_helper.from_array(np.asarray(value), name)
                    graph.initializer.append(tensor)
                    values[name] = tensor
                folded += 1
                continue
        kept.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
    return folded


def constant_only_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes (other than Constant) that compute on initializers and constants alone."""
    graph = model.graph
    constants = _constants(graph)
    found = []
    for node in graph.node:
        if node.op_type != "Constant" and node.input and all(i in constants for i in node.input if i):
            found.append(node)
            constants |= set(node.output)
    return found
