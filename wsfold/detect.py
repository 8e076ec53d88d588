"""Find layers whose convolution or linear op receives a derived weight, by running each layer alone.

Detection observes behaviour: each candidate module is called on small probe inputs at its own dtype while a
TorchFunctionMode records the weight, bias and geometry handed to conv*/conv_transpose*/linear and any F.pad
applied first. A class name only gives the layer a friendly name in the report.
"""

from __future__ import annotations

import inspect as _inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .formulas import (
    Formula,
    channel_subset,
    const_value,
    designed_weights,
    identify_formula,
    standardize_rounded,
    tolerance,
)
from .memory import FilePages

OPS: dict[str, Callable] = {
    "conv1d": F.conv1d,
    "conv2d": F.conv2d,
    "conv3d": F.conv3d,
    "conv_transpose1d": F.conv_transpose1d,
    "conv_transpose2d": F.conv_transpose2d,
    "conv_transpose3d": F.conv_transpose3d,
    "linear": F.linear,
}
_SIGNATURES = {
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "linear": ("input", "weight", "bias"),
    "pad": ("input", "pad", "mode", "value"),
}
# Exact types known to hand their own Parameter to the op; subclasses are still probed.
_PLAIN_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.PReLU,
    nn.MultiheadAttention,
    nn.Bilinear,
    nn.LSTM,
    nn.GRU,
    nn.RNN,
)
KNOWN_CLASSES = {
    "StdConv2d": "timm StdConv2d",
    "StdConv2dSame": "timm StdConv2dSame",
    "ScaledStdConv2d": "timm ScaledStdConv2d (NFNet)",
    "ScaledStdConv2dSame": "timm ScaledStdConv2dSame (NFNet)",
    "WeightStandardizedConv2d": "transformers BiT WeightStandardizedConv2d",
    "ConvWS2d": "mmcv ConvWS2d",
    "ConvAWS2d": "mmcv ConvAWS2d",
    "SAConv2d": "mmcv SAConv2d",
    "WSConv2D": "NFNet WSConv2D",
    "WSConv2d": "NFNet WSConv2d",
}


def op_kind(op: str) -> str:
    return "linear" if op == "linear" else ("conv_transpose" if op.startswith("conv_transpose") else "conv")


@dataclass
class OpCall:
    op: str
    args: dict[str, Any]
    output: torch.Tensor


@dataclass
class PadSpec:
    """Padding applied in forward before the op: a static F.pad, or TF-SAME padding computed from the input size."""

    mode: str  # constant | reflect | replicate | circular
    value: float
    pad: tuple[int, ...] | None  # F.pad order (last dim first); None when it depends on the input size
    same_dynamic: bool = False


@dataclass
class DerivedLayer:
    """A layer whose op receives a weight computed from its parameters (weight-standardized or otherwise)."""

    name: str
    type: str
    op: str
    geometry: dict[str, Any]
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    source_param: str
    formula: Formula | None
    misfit: float | None
    fan_in: int
    warnings: list[str] = field(default_factory=list)
    pad: PadSpec | None = None
    known_as: str | None = None
    bias_is_param: str | None = None
    # Kept only when no formula was identified: the baked weight is then the observed one.
    observed_weight: torch.Tensor | None = field(default=None, repr=False)
    observed_bias: torch.Tensor | None = field(default=None, repr=False)
    # The formula's weight rounded once, held only while detect_layers hands the layer to ``on_layer``.
    exact_weight: torch.Tensor | None = field(default=None, repr=False)
    # The layer whose full probes established this one's formula (None: probed fully itself).
    probed_as: str | None = None

    @property
    def formula_name(self) -> str:
        return self.formula.name if self.formula else "custom"

    @property
    def eps(self) -> float | None:
        return self.formula.eps if self.formula else None

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "known_as": self.known_as,
            "op": self.op,
            "formula": self.formula_name,
            "description": self.formula.description if self.formula else None,
            "eps": self.eps,
            "fan_in": self.fan_in,
            "out_channels": self.out_channels,
            "dtype": str(self.dtype).removeprefix("torch."),
            "padding": _pad_text(self.pad, self.geometry),
            "misfit": self.misfit,
            "probed_as": self.probed_as,
            "warnings": list(self.warnings),
        }


def _pad_text(pad: PadSpec | None, geometry: dict[str, Any]) -> str:
    if pad is None:
        return str(geometry.get("padding", 0))
    if pad.same_dynamic:
        return "TF-SAME (depends on input size)"
    return f"F.pad{pad.pad} {pad.mode}"


@dataclass
class SkippedLayer:
    name: str
    type: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "reason": self.reason}


@dataclass
class Detection:
    """What detect_layers found: layers to bake, layers it will not bake, and modules it could not run."""

    layers: list[DerivedLayer]
    unsupported: list[SkippedLayer]
    unprobed: list[SkippedLayer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "unsupported": [u.to_dict() for u in self.unsupported],
            "unprobed": [u.to_dict() for u in self.unprobed],
        }


class _Recorder(TorchFunctionMode):
    """Records conv/linear/pad calls made directly by the probed module (not by descendants with parameters).

    A recorded conv/linear is not computed: its output is a stand-in of the right shape (the op run on an empty
    batch) filled with random numbers, so that probing costs what the layer's own weight code costs and no
    convolution over a wide layer. Random values keep "the module returns the op's output" checkable."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[OpCall] = []
        self.depth = 0
        self._gen = torch.Generator().manual_seed(1234)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        recorded = self.depth == 0 and (name in OPS or name == "pad")
        out = self._stand_in(func, args, kwargs) if recorded and name in OPS else func(*args, **kwargs)
        if recorded:
            names = _SIGNATURES["pad" if name == "pad" else op_kind(name)]
            bound = dict(zip(names, args))
            bound.update(kwargs)
            self.calls.append(OpCall(name, bound, out))
        return out

    def _stand_in(self, func, args, kwargs):
        # The op run on an empty batch checks every shape and gives the output's, at no cost.
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        batched = isinstance(w, torch.Tensor) and (x.ndim >= 2 if w.ndim == 2 else x.ndim == w.ndim)
        if not isinstance(x, torch.Tensor) or not batched or x.shape[0] == 0:
            return func(*args, **kwargs)
        empty = x[:0]
        try:
            if args:
                shaped = func(empty, *args[1:], **kwargs)
            else:
                shaped = func(*args, **{**kwargs, "input": empty})
        except Exception:  # noqa: BLE001 - let the real op speak for itself
            return func(*args, **kwargs)
        shape = (x.shape[0], *shaped.shape[1:])
        return torch.randn(shape, generator=self._gen).to(shaped.dtype)


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(recurse=False))
    tensors.update(module.named_buffers(recurse=False))
    plist = getattr(module, "parametrizations", None)
    if plist is not None:
        for pname, entry in plist.items():
            for sub, t in entry.named_parameters(recurse=False):
                tensors[f"parametrizations.{pname}.{sub}"] = t
    return {k: v for k, v in tensors.items() if v is not None}


def _is_candidate(module: nn.Module) -> bool:
    if hasattr(module, "parametrizations"):
        return True
    if type(module) in _PLAIN_TYPES or isinstance(module, torch.nn.utils.parametrize.ParametrizationList):
        return False
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    own = [t for t in _own_tensors(module).values() if t.is_floating_point() and t.ndim >= 2]
    has_param_children = any(any(True for _ in c.parameters()) for c in module.children())
    return bool(own) and not has_param_children


def _probe_shapes(module: nn.Module, weight: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """Input shapes to try, as pairs of two different sizes, most plausible first."""
    if hasattr(module, "in_features"):
        return [[(2, module.in_features), (3, module.in_features)]]
    nd = weight.ndim - 2
    if nd <= 0:
        return [[(2, weight.shape[-1]), (3, weight.shape[-1])]] if weight.ndim == 2 else []
    ks = list(weight.shape[2:])
    stride = _as_tuple(getattr(module, "stride", 1), nd)
    dilation = _as_tuple(getattr(module, "dilation", 1), nd)
    # Small spatial sizes keep the probe convolutions cheap on wide layers; two sizes of different parity
    # reveal padding that depends on the input size.
    sizes = [max(4, (k - 1) * d + 1 + s) for k, d, s in zip(ks, dilation, stride)]
    channels = []
    if isinstance(getattr(module, "in_channels", None), int):
        channels.append(module.in_channels)
    groups = getattr(module, "groups", 1) if isinstance(getattr(module, "groups", 1), int) else 1
    channels += [weight.shape[1] * groups, weight.shape[0], weight.shape[1]]
    shapes = []
    for c in dict.fromkeys(channels):
        shapes.append([(1, c, *sizes), (2, c, *[s + 1 for s in sizes])])
    return shapes


def _as_tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    try:
        t = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return (1,) * n
    return t if len(t) == n else (t[0],) * n


def _run_probe(
    module: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    overrides: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, _Recorder, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    recorder = _Recorder()
    hooks = []
    for sub in module.modules():
        if sub is module or isinstance(sub, torch.nn.utils.parametrize.ParametrizationList):
            continue
        if any(True for _ in sub.parameters(recurse=False)):
            hooks.append(sub.register_forward_pre_hook(lambda *_: setattr(recorder, "depth", recorder.depth + 1)))
            hooks.append(sub.register_forward_hook(lambda *_: setattr(recorder, "depth", recorder.depth - 1)))
    try:
        with torch.no_grad(), recorder:
            out = torch.func.functional_call(module, overrides, (x,)) if overrides else module(x)
    finally:
        for h in hooks:
            h.remove()
    return out, recorder, x


def tf_same_pad(
    size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """TF "SAME" padding in F.pad order (last spatial dim first)."""
    pads: list[int] = []
    for n, k, s, d in zip(reversed(size), reversed(kernel), reversed(stride), reversed(dilation)):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _static(value: Any) -> Any:
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def _geometry(call: OpCall) -> dict[str, Any]:
    kind = op_kind(call.op)
    names = _SIGNATURES[kind][3:]
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
    return {k: _static(call.args.get(k, defaults[k])) for k in names}


class _WeightDigest:
    """Stands in for a probe's derived weight once it has been observed: its shape, an exact copy of the scored
    channel subset and two reductions (deterministic for equal tensors on CPU, and computed without a copy).
    Comparing two probes then needs no second full copy of a large weight; only the first probe's weight is
    kept whole (``tensor``)."""

    def __init__(self, weight: torch.Tensor, keep: bool = False) -> None:
        self.shape = weight.shape
        self.ndim = weight.ndim
        self.dtype = weight.dtype
        self.subset = weight.detach()[channel_subset(weight.shape[0])].clone()
        w = weight.detach()
        self.sums = (float(w.sum()), float(torch.linalg.vector_norm(w)))
        self.tensor = w if keep else None

    def same_as(self, other: _WeightDigest) -> bool:
        return self.shape == other.shape and torch.equal(self.subset, other.subset) and self.sums == other.sums


class _Tensors:
    """The model's parameters and buffers, by identity, without keeping them alive: a layer baked on the way
    frees its tensors, and a fresh tensor at a recycled address must not pass for one of them."""

    def __init__(self, model: nn.Module) -> None:
        tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
        tensors += [t for _, t in model.named_buffers(remove_duplicate=False) if t is not None]
        self._by_id = weakref.WeakValueDictionary({id(t): t for t in tensors})

    def __contains__(self, tensor: object) -> bool:
        return self._by_id.get(id(tensor)) is tensor


def _digest_derived(rec: _Recorder, param_ids: _Tensors, keep: bool = False) -> None:
    for call in rec.calls:
        w = call.args.get("weight")
        if call.op in OPS and isinstance(w, torch.Tensor) and w not in param_ids:
            call.args["weight"] = _WeightDigest(w, keep)


def _derived_weight_of(
    module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, param_ids: _Tensors, overrides=None
) -> torch.Tensor | None:
    """The derived weight the module hands to its op on one probe (with ``overrides`` substituted)."""
    _, rec, _ = _run_probe(module, shape, dtype, 0, overrides)
    calls = [c for c in rec.calls if c.op in OPS and c.args["weight"] not in param_ids]
    return calls[0].args["weight"] if len(calls) == 1 else None


def _observe_runs(name: str, type_name: str, runs, param_ids: _Tensors):
    """From two probe runs at different input sizes: the single derived-weight op call (of the first run) and
    its padding, or a SkippedLayer saying why the module is not [pad] + one op, or None if nothing is derived."""
    derived_runs = []
    for shape, out, rec, x in runs:
        ops = [c for c in rec.calls if c.op in OPS]
        derived = [c for c in ops if isinstance(c.args["weight"], _WeightDigest)]
        derived_runs.append((shape, out, rec, x, ops, derived))
    first = derived_runs[0]
    if not first[5]:
        return None
    if any(len(r[5]) != len(first[5]) for r in derived_runs):
        return SkippedLayer(name, type_name, "calls a different number of ops for different inputs")
    if len(first[4]) > 1:
        ops_list = ", ".join(c.op for c in first[4])
        return SkippedLayer(
            name, type_name, f"calls {len(first[4])} ops ({ops_list}) with derived weights; it is not one plain op"
        )
    call = first[5][0]
    for r in derived_runs[1:]:
        other = r[5][0]
        if not other.args["weight"].same_as(call.args["weight"]):
            return SkippedLayer(name, type_name, "its weight depends on the input; it cannot become a constant")
        b_a, b_b = call.args.get("bias"), other.args.get("bias")
        if (b_a is None) != (b_b is None) or (b_a is not None and not torch.equal(b_a, b_b)):
            return SkippedLayer(name, type_name, "its bias depends on the input; it cannot become a constant")
        if _geometry(other) != _geometry(call):
            return SkippedLayer(name, type_name, "its stride/padding/groups change with the input size")

    # The module must be nothing but [pad] + op: its output is the op's output, the op's input is the
    # module's input (directly or through one F.pad of it).
    pads_per_run = []
    for shape, out, rec, x, _ops, derived in derived_runs:
        c = derived[0]
        if out is not c.output and not (
            isinstance(out, torch.Tensor) and out.shape == c.output.shape and torch.equal(out, c.output)
        ):
            return SkippedLayer(name, type_name, "does more than one op (its output is not the op's output)")
        inp = c.args["input"]
        if inp is x:
            pads_per_run.append(None)
            continue
        pad_calls = [p for p in rec.calls if p.op == "pad" and p.output is inp]
        if not pad_calls or pad_calls[0].args["input"] is not x:
            return SkippedLayer(name, type_name, "transforms its input before the op in a way other than padding")
        p = pad_calls[0].args
        mode = p.get("mode", "constant") or "constant"
        pads_per_run.append((mode, float(p.get("value") or 0.0), tuple(int(v) for v in p["pad"]), shape))
    if all(p is None for p in pads_per_run):
        return call, None
    if any(p is None for p in pads_per_run) or len({(p[0], p[1]) for p in pads_per_run}) > 1:
        return SkippedLayer(name, type_name, "pads its input differently for different input sizes")
    mode, value = pads_per_run[0][0], pads_per_run[0][1]
    if len({p[2] for p in pads_per_run}) == 1:
        return call, PadSpec(mode, value, pads_per_run[0][2])
    w = call.args["weight"]
    nd = w.ndim - 2
    geometry = _geometry(call)
    k, s, d = tuple(w.shape[2:]), _as_tuple(geometry["stride"], nd), _as_tuple(geometry["dilation"], nd)
    if mode == "constant" and all(tf_same_pad(p[3][2:], k, s, d) == p[2] for p in pads_per_run):
        return call, PadSpec(mode, value, None, same_dynamic=True)
    return SkippedLayer(
        name, type_name, "pads its input by an amount that depends on the input size and is not TF-SAME"
    )


@dataclass
class _Learned:
    """What fully probing one layer established about every module with the same signature (see _signature):
    which probe input fits, where the weight comes from, and the form of its formula."""

    layer: str
    shape_index: int
    raw_name: str
    bias_param: str | None
    formula: Formula


# Attributes that describe a module's shape rather than its math: modules differing only in these share a
# signature (a formula's constant that uses one is re-evaluated per module).
_SHAPE_ATTRS = frozenset({"in_channels", "out_channels", "in_features", "out_features", "groups"})


def _signature(module: nn.Module, own: dict[str, torch.Tensor], scalars: dict[str, float]) -> tuple | None:
    """Modules with equal signatures run the same code with the same constants: same class, the same named
    tensors (rank and dtype), equal numeric attributes. None for modules whose behaviour can be changed per
    instance (a forward or hooks of their own, parametrizations): those are always probed fully."""
    if hasattr(module, "parametrizations") or "forward" in vars(module):
        return None
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    tensors = tuple(sorted((k, t.ndim, t.dtype) for k, t in own.items()))
    consts = tuple(sorted((k, v) for k, v in scalars.items() if k not in _SHAPE_ATTRS))
    return (type(module), tensors, consts)


class _Prober:
    """Analyses candidate modules one at a time.

    The first module of each signature is probed fully: two real probes at different input sizes (padding and
    input dependence), then designed weights that separate formulas the real weight cannot. A later module of
    the same signature is run once on its real weight and accepted only when the formula of the same form,
    evaluated in float64, reproduces on every channel what its own code computed; anything else sends it
    through the full probes too. Either way every layer's own output is checked whole."""

    def __init__(self, param_ids: _Tensors, keep_weights: bool) -> None:
        self.param_ids = param_ids
        self.keep_weights = keep_weights
        self.learned: dict[tuple, _Learned] = {}

    def analyse(self, name: str, module: nn.Module) -> DerivedLayer | SkippedLayer | None:
        own = _own_tensors(module)
        weights = [t for t in own.values() if t.is_floating_point() and t.ndim >= 2]
        if not weights:
            return SkippedLayer(name, type(module).__name__, "could not be run on a probe input")
        largest = max(weights, key=lambda t: t.numel())
        scalars, eps_hints = _scalar_attributes(module)
        signature = _signature(module, own, scalars)
        learned = self.learned.get(signature) if signature is not None else None
        if learned is not None:
            layer = self._quick(name, module, own, largest, scalars, learned)
            if layer is not None:
                return layer
        result, learned = self._full(name, module, own, largest, scalars, eps_hints)
        if signature is not None and learned is not None:
            self.learned.setdefault(signature, learned)
        return result

    def _quick(self, name, module, own, largest, scalars, learned: _Learned) -> DerivedLayer | None:
        shapes = _probe_shapes(module, largest)
        if learned.shape_index >= len(shapes):
            return None
        shape = shapes[learned.shape_index][0]
        try:
            out, rec, x = _run_probe(module, shape, largest.dtype, 0)
        except Exception:  # noqa: BLE001 - then the full probes decide
            return None
        ops = [c for c in rec.calls if c.op in OPS]
        if len(ops) != 1 or any(c.op == "pad" for c in rec.calls):
            return None
        call = ops[0]
        w0, bias = call.args.get("weight"), call.args.get("bias")
        raw = own.get(learned.raw_name)
        if not isinstance(w0, torch.Tensor) or w0 in self.param_ids or raw is None or raw.shape != w0.shape:
            return None
        if out is not call.output or call.args["input"] is not x:
            return None
        bias_param = next((k for k, t in own.items() if t is bias), None) if bias is not None else None
        if bias_param != learned.bias_param or (bias is not None and bias_param is None):
            return None  # a computed bias needs the second probe (does it depend on the input?)
        n = int(w0[0].numel())
        try:
            formula = replace(learned.formula, scale_const=const_value(learned.formula.scale_const_name, scalars, n))
        except KeyError:
            return None
        per_channel = _per_channel(own, w0.shape[0], learned.raw_name, bias_param)
        scale, shift = formula.affine_tensors(per_channel)
        if (formula.scale_tensor and scale is None) or (formula.shift_tensor and shift is None):
            return None
        rounded = standardize_rounded(
            raw, formula, scale, shift, dtype=w0.dtype, observed=w0, keep=self.keep_weights, done_rows=self._done(raw)
        )
        if not rounded.misfit <= tolerance(w0.dtype):
            return None
        layer = self._layer(name, module, call, w0, None, learned.raw_name, bias_param, formula, rounded)
        layer.probed_as = learned.layer
        return layer

    def _full(self, name, module, own, largest, scalars, eps_hints):
        type_name = type(module).__name__
        dtype = largest.dtype
        errors = []
        runs = None
        shape_index = -1
        for shapes in _probe_shapes(module, largest):
            shape_index += 1
            try:
                runs = []
                for seed, shape in enumerate(shapes):
                    out, rec, x = _run_probe(module, shape, dtype, seed)
                    # Only the first probe's derived weight is kept whole; later ones are digested at once.
                    _digest_derived(rec, self.param_ids, keep=seed == 0)
                    runs.append((shape, out, rec, x))
                    del out, rec, x
                break
            except Exception as exc:  # noqa: BLE001 - a wrong guess of the input shape raises anything
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                runs = None
        if runs is None:
            reason = "could not be run on a probe input" + (f" ({errors[0]})" if errors else "")
            return SkippedLayer(name, type_name, reason), None

        observed = _observe_runs(name, type_name, runs, self.param_ids)
        probe_shape = runs[0][0]
        del runs  # each run holds its derived weight
        if observed is None or isinstance(observed, SkippedLayer):
            return observed, None
        call, pad_spec = observed
        del observed
        w0 = call.args["weight"].tensor
        digest = call.args["weight"]
        bias = call.args.get("bias")

        # Where does the weight come from: the raw tensor of the same shape among the layer's own tensors.
        raw_name, raw = next(
            ((k, t) for k, t in own.items() if t.shape == w0.shape and t.is_floating_point()), (None, None)
        )
        bias_param = next((k for k, t in own.items() if t is bias), None) if bias is not None else None
        formula = rounded = None
        if raw is not None:
            per_channel = _per_channel(own, w0.shape[0], raw_name, bias_param)
            # Score formulas on a subset of channels (the real weight and the designed ones), then check the
            # winner on all of them.
            keep = channel_subset(raw.shape[0])
            observations = [(raw[keep], digest.subset)]
            for designed in designed_weights(raw):
                captured = _derived_weight_of(module, probe_shape, dtype, self.param_ids, {raw_name: designed})
                if captured is not None and captured.shape == raw.shape:
                    observations.append((designed[keep], captured[keep].clone()))
                del designed, captured
            found = identify_formula(
                observations, {k: v.reshape(-1)[keep] for k, v in per_channel.items()}, scalars, eps_hints
            )
            if found:
                f = found[0]
                full = standardize_rounded(
                    raw,
                    f,
                    *f.affine_tensors(per_channel),
                    dtype=w0.dtype,
                    observed=w0,
                    keep=self.keep_weights,
                    done_rows=self._done(raw),
                )
                if full.misfit <= tolerance(w0.dtype):
                    formula, rounded = f, full
        layer = self._layer(name, module, call, w0, pad_spec, raw_name, bias_param, formula, rounded)
        clean = formula is not None and pad_spec is None and raw_name is not None and (bias is None or bias_param)
        learned = _Learned(name, shape_index, raw_name, bias_param, formula) if clean else None
        return layer, learned

    def _done(self, raw: torch.Tensor):
        """When baking, a memory-mapped source weight's pages are handed back as soon as they have been read for
        the last time (the baked layer replaces it)."""
        return FilePages(raw).release if self.keep_weights else None

    def _layer(self, name, module, call, w0, pad_spec, raw_name, bias_param, formula, rounded) -> DerivedLayer:
        bias = call.args.get("bias")
        fan_in = int(w0[0].numel())
        type_name = type(module).__name__
        layer = DerivedLayer(
            name=name,
            type=type_name,
            op=call.op,
            geometry=_geometry(call),
            weight_shape=tuple(w0.shape),
            dtype=w0.dtype,
            source_param=raw_name or "",
            formula=formula,
            misfit=None if rounded is None else rounded.misfit,
            fan_in=fan_in,
            pad=pad_spec,
            known_as=KNOWN_CLASSES.get(type_name)
            or ("torch.nn.utils.parametrize" if hasattr(module, "parametrizations") else None),
            bias_is_param=bias_param,
        )
        if formula is None:
            layer.observed_weight = w0.detach().clone()
            layer.observed_bias = None if bias is None else bias.detach().clone()
            layer.warnings.append("formula not identified: the observed weight is baked as is")
        else:
            layer.exact_weight = rounded.weight
            if bias is not None and bias_param is None:
                layer.observed_bias = bias.detach().clone()
            low = int((rounded.var_b < formula.eps).sum())
            if low:
                layer.warnings.append(f"{low} filter(s) with variance below eps={formula.eps:g}")
        if fan_in < 16:
            layer.warnings.append(f"fan-in {fan_in} < 16: statistics from {fan_in} numbers")
        if not raw_name:
            layer.warnings.append("no parameter of the weight's shape: the observed weight is baked as is")
        return layer


def _per_channel(own: dict[str, torch.Tensor], channels: int, raw_name, bias_param) -> dict[str, torch.Tensor]:
    """The layer's other tensors with one value per output channel (gains, AWS gamma/beta)."""
    return {
        k: t
        for k, t in own.items()
        if k not in (raw_name, bias_param) and t.is_floating_point() and t.numel() == channels
    }


def _scalar_attributes(module: nn.Module) -> tuple[dict[str, float], list[float]]:
    scalars: dict[str, float] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            scalars[key] = float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            scalars[key] = float(value.item())
    for key, value in module.named_buffers(recurse=False):
        if value is not None and value.numel() == 1 and value.is_floating_point():
            scalars[key] = float(value.item())
    eps_hints = [v for k, v in scalars.items() if "eps" in k.lower()]
    # eps may also be a forward() default argument
    try:
        for p in _inspect.signature(module.forward).parameters.values():
            if "eps" in p.name.lower() and isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
                eps_hints.append(float(p.default))
    except (TypeError, ValueError):
        pass
    return scalars, eps_hints


def detect_layers(
    model: nn.Module,
    progress: Callable[[int, int], None] | None = None,
    *,
    on_layer: Callable[[DerivedLayer], None] | None = None,
) -> Detection:
    """Probe every candidate module of ``model`` and report the ones with a derived weight. Never mutates ``model``.

    With ``on_layer``, each layer found is handed over at once with its exact weight (``exact_weight``, the
    formula in float64 rounded once) so the caller can bake it before the next is probed; the weight is not
    kept in the returned Detection."""
    param_ids = _Tensors(model)
    # Names, not module objects: a layer baked on the way (on_layer) must not be kept alive by this loop.
    candidates = [n for n, m in model.named_modules() if _is_candidate(m)]
    prober = _Prober(param_ids, keep_weights=on_layer is not None)
    layers: list[DerivedLayer] = []
    unsupported: list[SkippedLayer] = []
    unprobed: list[SkippedLayer] = []
    was_training = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        for i, name in enumerate(candidates):
            # A layer inside an unsupported one must not be baked on its own: the parent's math would be split.
            # named_modules() lists parents first, so the parent's verdict is known by now.
            if any(name.startswith(u.name + ".") for u in unsupported if u.name):
                result = None
            else:
                result = prober.analyse(name, model.get_submodule(name))
            if isinstance(result, DerivedLayer):
                layers.append(result)
                if on_layer is not None:
                    on_layer(result)
                result.exact_weight = None
            elif isinstance(result, SkippedLayer):
                (unprobed if result.reason.startswith("could not be run") else unsupported).append(result)
            del result
            if progress:
                progress(i + 1, len(candidates))
    finally:
        for n, m in model.named_modules():
            if n in was_training:
                m.training = was_training[n]
    return Detection(layers, unsupported, unprobed)
