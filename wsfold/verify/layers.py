"""The per-layer check: each conv/linear layer of the baked model against the tensors the graph feeds its op.

Pairs come from the graph's structure, not from names or shapes: every Conv/ConvTranspose/Gemm/MatMul node
whose weight is a constant (an initializer or a Constant, through Identity/Cast/Transpose) is a graph layer;
its weight is read in PyTorch's layout (a MatMul's or a Gemm's transposed weight turned back) with the bias the
graph adds (Conv's third input, Gemm's C, the constant an Add puts on a MatMul's output; none means zero).
A baked layer is paired with the graph layer whose weight and bias agree with it on most output channels (two
random projections of each filter, and the bias): a damaged filter keeps its pair and fails, a layer of another
model finds none. What pairs is then compared element by element, to 2 ulp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..bake.modeltree import eval_mode
from ..errors import VerifyInputError, first_line
from ..io.memory import trim_heap

if TYPE_CHECKING:
    from ..bake.findings import Detection
    from ..pipeline import Prepared

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that hand a constant on unchanged in value (a Cast changes its precision only; the check allows for it).
_PASS_THROUGH = ("Identity", "Cast", "CastLike")
# A baked layer pairs with a graph layer that agrees with it on at least this share of its output channels.
PAIR_SHARE = 0.5
# A channel agrees when each projection of its filter, and its bias, is within this share of the layer's scale.
AGREE = 0.1


@dataclass
class LayerCheck:
    """One baked layer against the graph op it was paired with (``initializer`` None: none was found)."""

    name: str
    tensor: str
    initializer: str | None
    max_abs_error: float
    max_rel_error: float
    passed: bool
    note: str | None = None
    node: str | None = None
    paired: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerReport:
    """Every compared layer, and how many had no counterpart in the graph (``unpaired``: names)."""

    checks: list[LayerCheck] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    compared: int = 0  # baked layers looked for in the graph
    by_value: int = 0  # of them, paired by their weights (the rest by elimination, or not at all)

    @property
    def none_paired(self) -> bool:
        """No layer's weights agree with any op's: the graph is of another model (or another checkpoint)."""
        return self.compared > 0 and self.by_value == 0


@dataclass
class _Constant:
    """Where a constant's value is (an initializer's name, or a Constant node's tensor) and what the edges
    between it and the op do to it (transposes, in order)."""

    name: str
    dims: list[int]
    tensor: Any | None = None  # a Constant node's TensorProto
    perms: list[list[int]] = field(default_factory=list)


@dataclass
class GraphLayer:
    """A compute node whose weight is a constant: where its weight and bias come from."""

    node: str
    op: str
    weight: _Constant
    transposed: bool  # PyTorch's layout is the transpose of the 2-D weight as the op reads it
    bias: _Constant | None
    alpha: float = 1.0
    beta: float = 1.0


class GraphConstants:
    """The graph's initializers and Constant values by name, each read when it is looked at: data stays on disk
    until then (read as onnxruntime reads it: a data file that is a link is followed)."""

    def __init__(self, proto, onnx_path: Path) -> None:
        self.base_dir = onnx_path.parent
        self.onnx_path = onnx_path
        self.tensors = {t.name: t for t in proto.graph.initializer}

    def value(self, ref: _Constant) -> np.ndarray:
        from ..onnx.store import to_array

        tensor = ref.tensor if ref.tensor is not None else self.tensors[ref.name]
        try:
            value = to_array(tensor, self.base_dir)
        except (OSError, ValueError) as exc:
            raise VerifyInputError(
                f"the weights of {self.onnx_path} cannot be read for the per-layer check ({first_line(exc)}).",
                "re-export it with `wsfold export`, or pass --no-per-layer.",
            ) from None
        for perm in ref.perms:
            value = np.transpose(value, perm) if perm else value.T
        return value


def graph_layers(proto) -> list[GraphLayer]:
    """Every Conv/ConvTranspose/Gemm/MatMul node of the main graph whose weight is a constant."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}

    def constant(name: str, depth: int = 0) -> _Constant | None:
        if name in inits:
            return _Constant(name, inits[name])
        node = producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return _Constant(name, list(attr.t.dims), attr.t) if attr is not None else None
        if node.op_type in _PASS_THROUGH or node.op_type == "Transpose":
            found = constant(node.input[0], depth + 1)
            if found is not None and node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
                found.perms.append(perm)
            return found
        return None

    layers = []
    for node in proto.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        attrs = {a.name: a for a in node.attribute}
        weight = constant(node.input[1])
        if weight is None:
            continue
        bias, transposed, alpha, beta = None, False, 1.0, 1.0
        if node.op_type in ("Conv", "ConvTranspose"):
            bias = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        elif node.op_type == "Gemm":
            if "transA" in attrs and attrs["transA"].i:
                continue  # the constant is not a weight laid out as a layer's
            transposed = not ("transB" in attrs and attrs["transB"].i)
            alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
            beta = attrs["beta"].f if "beta" in attrs else 1.0
            bias = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        else:  # MatMul: x @ W^T stored as the transpose; the bias, if any, added by the Add that follows
            transposed = True
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add":
                other = next((i for i in users[0].input if i != node.output[0]), None)
                bias = constant(other) if other else None
                if bias is not None and any(d != 1 for d in bias.dims[:-1]):
                    bias = None  # a constant added across more than the output channels: not a layer's bias
        layers.append(GraphLayer(node.name or node.output[0], node.op_type, weight, transposed, bias, alpha, beta))
    return layers


def _projection(fan: int) -> np.ndarray:
    """Two fixed random directions in a filter's space (the same for a layer and its graph op)."""
    return np.random.default_rng(fan).standard_normal((fan, 2))


@dataclass
class _Fingerprint:
    rows: np.ndarray  # (dim 0 of the weight, 2): two projections of each filter
    bias: np.ndarray  # the bias as the op adds it (empty: none)


def _fingerprint(weight: np.ndarray, bias: np.ndarray | None) -> _Fingerprint:
    w = weight.astype(np.float64).reshape(weight.shape[0], -1)
    b = np.zeros(0) if bias is None else bias.astype(np.float64).reshape(-1)
    return _Fingerprint(w @ _projection(w.shape[1]), b)


def _agreement(a: _Fingerprint, b: _Fingerprint) -> tuple[float, float, float]:
    """(share of filters that agree, share of bias values that agree, mean distance): which graph layer a baked
    layer is. The filters decide; the bias only tells apart layers whose filters agree (all-zero ones). A
    missing bias counts as zeros (an exporter drops a zero bias)."""
    scale = np.maximum(np.abs(a.rows).max(axis=0), np.abs(b.rows).max(axis=0))
    diff = np.abs(a.rows - b.rows)
    rows = float((diff <= AGREE * scale + 1e-30).all(axis=1).mean())
    size = max(a.bias.size, b.bias.size)
    bias_a = a.bias if a.bias.size else np.zeros(size)
    bias_b = b.bias if b.bias.size else np.zeros(size)
    if bias_a.size != bias_b.size:
        return rows, 0.0, float("inf")
    if not size:
        return rows, 1.0, float(diff.mean())
    bias_diff = np.abs(bias_a - bias_b)
    bias_scale = max(float(np.abs(bias_a).max()), float(np.abs(bias_b).max()))
    bias = float((bias_diff <= AGREE * bias_scale + 1e-30).mean())
    return rows, bias, float(diff.mean() + bias_diff.mean())


def _exporter_fusions(model: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, scale, shift) per channel of every eval-mode BatchNorm: torch.onnx's TorchScript exporter fuses a
    BatchNorm into the Conv before it by itself (when wsfold could not fold it, e.g. an untraceable model)."""
    fusions = []
    for name, m in model.named_modules():
        # Whatever mode the model was handed in: export and verify both evaluate it in eval mode.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            a = 1.0 / torch.sqrt(m.running_var.double() + m.eps)
            if m.weight is not None:
                a = a * m.weight.detach().double()
            shift = -m.running_mean.double() * a
            if m.bias is not None:
                shift = shift + m.bias.detach().double()
            fusions.append((name, a.numpy(), shift.numpy()))
    return fusions


def _called_layers(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> set[int] | None:
    """The conv/linear modules (by identity) that one forward pass on ``sample`` calls; None if it cannot run."""
    called: set[int] = set()
    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    hooks = [m.register_forward_pre_hook(lambda mod, _: called.add(id(mod))) for m in layers]
    try:
        with torch.no_grad(), eval_mode(model):
            model(*sample)
    except Exception:  # noqa: BLE001 - compare everything then
        return None
    finally:
        for h in hooks:
            h.remove()
    return called


def _baked_candidates(
    original: nn.Module, detection: Detection, fold_state: str | None, prepared: Prepared | None
) -> Iterator[nn.Module]:
    """The baked model(s) a graph may have been exported from: folded or not as its metadata says (both when it
    says nothing), reusing the prepared model where its folding matches."""
    from ..bake.baker import bake_model
    from ..bake.fold import fold_model

    wanted = {"1": [True], "0": [False]}.get(fold_state or "", [True, False])
    baked = None
    for folded in wanted:
        if prepared is not None and prepared.folded == folded and prepared.model is not None:
            yield prepared.model
            continue
        if baked is None:
            baked, _ = bake_model(original, detection, allow_nonfinite=True)
        yield fold_model(baked)[0] if folded else baked


def compare_layers(
    model: nn.Module,
    detection: Detection,
    onnx_path: Path,
    *,
    prepared: Prepared | None = None,
    sample: tuple[torch.Tensor, ...] | None = None,
) -> LayerReport:
    """Each conv/linear layer of the baked model against the graph layer it pairs with (see the module's
    docstring), so that a wrong weight is named by the layer it belongs to. The baked model is folded as the
    graph's metadata says (``wsfold_fold``); a graph that does not say is compared with both and judged by the
    closer. With a ``sample`` input, layers the model never calls on it are not looked for: the exporter drops
    them. A graph exported with ``--dtype`` (``wsfold_dtype``) is held to that precision."""
    from google.protobuf.message import DecodeError

    from ..onnx.store import load_without_weights

    # Weights are read one at a time, when fingerprinted or compared, not with the graph.
    try:
        proto = load_without_weights(onnx_path)
    except (OSError, ValueError, DecodeError) as exc:
        raise VerifyInputError(
            f"{onnx_path} cannot be read for the per-layer check ({first_line(exc)}).",
            "re-export it with `wsfold export`, or pass --no-per-layer.",
        ) from None
    meta = {p.key: p.value for p in proto.metadata_props}
    cast = getattr(torch, meta.get("wsfold_dtype", ""), None)
    cast = cast if isinstance(cast, torch.dtype) else None
    constants = GraphConstants(proto, onnx_path)
    ops = _OpTable(graph_layers(proto), constants)
    del proto
    trim_heap()  # every weight was read once for its fingerprint: the heap it passed through goes back
    best: LayerReport | None = None
    for baked in _baked_candidates(model, detection, meta.get("wsfold_fold"), prepared):
        called = _called_layers(baked, sample) if sample is not None else None
        report = _check_layers(baked, detection, ops, called, cast)
        if best is None or _score(report) > _score(best):
            best = report
    return best or LayerReport()


def _score(report: LayerReport) -> tuple[int, int]:
    return sum(c.passed for c in report.checks), len(report.checks)


class _OpTable:
    """The graph's layers by weight shape (PyTorch's layout), each one's fingerprint computed once."""

    def __init__(self, layers: list[GraphLayer], constants: GraphConstants) -> None:
        self.constants = constants
        self.by_shape: dict[tuple[int, ...], list[tuple[GraphLayer, _Fingerprint]]] = {}
        for layer in layers:
            weight, bias = self.tensors(layer)
            if weight.ndim < 2:
                continue
            self.by_shape.setdefault(tuple(weight.shape), []).append((layer, _fingerprint(weight, bias)))

    def tensors(self, layer: GraphLayer) -> tuple[np.ndarray, np.ndarray | None]:
        """The op's weight in PyTorch's layout and its bias (as the op applies them: Gemm's alpha and beta)."""
        weight = self.constants.value(layer.weight)
        if layer.transposed and weight.ndim == 2:
            weight = weight.T
        if layer.alpha != 1.0:
            weight = weight * layer.alpha
        bias = None if layer.bias is None else self.constants.value(layer.bias)
        if bias is not None and layer.beta != 1.0:
            bias = bias * layer.beta
        return weight, bias

    def closest(
        self, weight: np.ndarray, bias: np.ndarray | None, among: set[str] | None = None
    ) -> tuple[GraphLayer | None, float]:
        """The graph layer of ``weight``'s shape (of the nodes ``among``, when given) whose filters agree most
        with it, and the share of its filters that agree."""
        candidates = [(g, f) for g, f in self.by_shape.get(tuple(weight.shape), []) if among is None or g.node in among]
        if not candidates:
            return None, 0.0
        mine = _fingerprint(weight, bias)
        scored = [(_agreement(mine, theirs), layer) for layer, theirs in candidates]
        (rows, bias, _), layer = max(scored, key=lambda s: (s[0][0], s[0][1], -s[0][2]))
        return layer, rows

    def nodes(self) -> set[str]:
        return {g.node for found in self.by_shape.values() for g, _ in found}


def _check_layers(
    baked: nn.Module, detection: Detection, ops: _OpTable, called: set[int] | None, cast: torch.dtype | None
) -> LayerReport:
    owners = sorted((layer.name for layer in detection.layers), key=len, reverse=True)
    fusions = _exporter_fusions(baked)
    report = LayerReport()
    leftover: list[tuple[str, str, np.ndarray, np.ndarray | None, torch.dtype]] = []
    claimed: set[str] = set()
    for name, module in baked.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        if called is not None and id(module) not in called:
            continue  # never called: not in the graph
        # A baked layer may have become Sequential(pad, conv): its tensors belong to the layer it replaced.
        owner = next((n for n in owners if name == n or name.startswith(n + ".") or n == ""), name)
        report.compared += 1
        weight = module.weight.detach().double().numpy()
        bias = None if module.bias is None else module.bias.detach().double().numpy()
        # The graph may be rounded to a coarser dtype than the baked tensor (export --dtype), or be finer than it
        # (a float16 checkpoint exported as float32): either way 2 ulp of the coarser.
        coarse = max((module.weight.dtype, cast or module.weight.dtype), key=lambda d: torch.finfo(d).eps)
        variants = [(weight, bias, None)]
        if not isinstance(module, nn.modules.conv._ConvTransposeNd):
            for bn, a, shift in fusions:
                if a.shape[0] == weight.shape[0]:
                    view = a.reshape(-1, *([1] * (weight.ndim - 1)))
                    fused_bias = (0.0 if bias is None else bias * a) + shift
                    variants.append(
                        (weight * view, fused_bias, f"matches with BatchNorm {bn} fused into it by the exporter")
                    )
        judged = None
        for w, b, note in variants:
            layer, share = ops.closest(w, b)
            if layer is None or share < PAIR_SHARE:
                continue
            checks = _judge_layer(owner, name, layer, ops, w, b, coarse, note)
            if judged is None or all(c.passed for c in checks):
                judged, node = checks, layer.node
            if all(c.passed for c in checks):
                break
        if judged is None:
            leftover.append((owner, name, weight, bias, coarse))
        else:
            report.checks.extend(judged)
            report.by_value += 1
            claimed.add(node)
    # A layer whose weights agree with no op's (changed by more than a few percent, or another model's) is paired
    # by elimination with the op of its shape that no other layer takes, and fails there; only a layer with no
    # such op left is "not in the graph" (the exporter dropped it).
    free = ops.nodes() - claimed
    for owner, name, weight, bias, coarse in leftover:
        layer, _ = ops.closest(weight, bias, among=free)
        if layer is None:
            report.unpaired.append(owner if owner == name else f"{owner} ({name})")
            continue
        free.discard(layer.node)
        note = "paired by elimination: the only op of its shape that no other layer takes"
        checks = _judge_layer(owner, name, layer, ops, weight, bias, coarse, note)
        for check in checks:
            check.note = note
        report.checks.extend(checks)
    return report


def _judge_layer(
    owner: str,
    name: str,
    layer: GraphLayer,
    ops: _OpTable,
    weight: np.ndarray,
    bias: np.ndarray | None,
    coarse: torch.dtype,
    note: str | None,
) -> list[LayerCheck]:
    """The weight and bias of the baked layer ``name`` against those the graph feeds ``layer``."""
    got_w, got_b = ops.tensors(layer)
    prefix = f"{name}." if name else ""
    checks = [_judge(owner, prefix + "weight", layer, layer.weight.name, weight, got_w, coarse, note)]
    if bias is not None or got_b is not None:
        size = (bias if bias is not None else got_b).size
        expected = np.zeros(size) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        got = np.zeros(size) if got_b is None else got_b.reshape(-1)
        if got.size == 1 and expected.size > 1:
            got = np.broadcast_to(got, expected.shape)
        where = layer.bias.name if layer.bias is not None else "(none: zero)"
        if got.shape != expected.shape:
            checks.append(
                LayerCheck(owner, prefix + "bias", where, float("inf"), float("inf"), False, None, layer.node)
            )
        else:
            checks.append(_judge(owner, prefix + "bias", layer, where, expected, got, coarse, note))
    return checks


def _judge(
    owner: str,
    key: str,
    layer: GraphLayer,
    where: str,
    expected: np.ndarray,
    got: np.ndarray,
    coarse: torch.dtype,
    note: str | None,
) -> LayerCheck:
    """``got`` (the graph's) against ``expected`` (the baked layer's), to 2 ulp of the coarser of their dtypes."""
    err = float(np.abs(got.astype(np.float64) - expected).max()) if expected.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    scale = scale or 1.0
    eps = max(float(np.finfo(got.dtype).eps), torch.finfo(coarse).eps) if got.dtype.kind == "f" else 0.0
    passed = bool(err <= 2 * eps * scale)
    return LayerCheck(owner, key, where, err, err / scale, passed, note if passed else None, layer.node)


def layer_names(baked: nn.Module, onnx_path: Path) -> dict[str, str]:
    """Graph node name -> the name of the baked model's conv/linear layer it computes, paired as the per-layer
    check pairs them (by the weights the graph feeds the node, never by names)."""
    from ..onnx.store import load_without_weights

    proto = load_without_weights(onnx_path)
    ops = _OpTable(graph_layers(proto), GraphConstants(proto, onnx_path))
    names: dict[str, str] = {}
    for name, module in baked.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            bias = None if module.bias is None else module.bias.detach().double().numpy()
            layer, share = ops.closest(module.weight.detach().double().numpy(), bias)
            if layer is not None and share >= PAIR_SHARE:
                names.setdefault(layer.node, name)
    return names
