"""Find layers whose convolution or linear op receives a derived weight, by running each layer alone.

Detection observes behaviour: each candidate module is called on small probe inputs at its own dtype while a
TorchFunctionMode records the weight, bias and geometry handed to conv*/conv_transpose*/linear and any F.pad
applied first. A class name only gives the layer a friendly name in the report.
"""

from __future__ import annotations

import inspect as _inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .formulas import (
    Formula,
    channel_stats,
    channel_subset,
    designed_weights,
    formula_misfit,
    identify_formula,
    tolerance,
)

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
    """Records conv/linear/pad calls made directly by the probed module (not by descendants with parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[OpCall] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if self.depth == 0 and (name in OPS or name == "pad"):
            names = _SIGNATURES["pad" if name == "pad" else op_kind(name)]
            bound = dict(zip(names, args))
            bound.update(kwargs)
            self.calls.append(OpCall(name, bound, out))
        return out


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
    Comparing two probes then needs no second full copy of a large weight (it is observed again when needed)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.shape = weight.shape
        self.ndim = weight.ndim
        self.dtype = weight.dtype
        self.subset = weight.detach()[channel_subset(weight.shape[0])].clone()
        w = weight.detach()
        self.sums = (float(w.sum()), float(torch.linalg.vector_norm(w)))

    def same_as(self, other: _WeightDigest) -> bool:
        return self.shape == other.shape and torch.equal(self.subset, other.subset) and self.sums == other.sums


def _digest_derived(rec: _Recorder, param_ids: set[int]) -> None:
    for call in rec.calls:
        w = call.args.get("weight")
        if call.op in OPS and isinstance(w, torch.Tensor) and id(w) not in param_ids:
            call.args["weight"] = _WeightDigest(w)


def _derived_weight_of(
    module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, param_ids: set[int], overrides=None
) -> torch.Tensor | None:
    """The derived weight the module hands to its op on one probe (with ``overrides`` substituted)."""
    _, rec, _ = _run_probe(module, shape, dtype, 0, overrides)
    calls = [c for c in rec.calls if c.op in OPS and id(c.args["weight"]) not in param_ids]
    return calls[0].args["weight"] if len(calls) == 1 else None


def _observe_runs(name: str, type_name: str, runs, param_ids: set[int]):
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


def _analyse(name: str, module: nn.Module, params: dict[str, torch.Tensor]) -> DerivedLayer | SkippedLayer | None:
    own = _own_tensors(module)
    weights = [t for t in own.values() if t.is_floating_point() and t.ndim >= 2]
    dtype = max(weights, key=lambda t: t.numel()).dtype if weights else next(iter(own.values())).dtype
    type_name = type(module).__name__
    errors = []
    runs = None
    param_ids = {id(p) for p in params.values()}
    for shapes in _probe_shapes(module, max(weights, key=lambda t: t.numel())) if weights else []:
        try:
            runs = []
            for seed, shape in enumerate(shapes):
                out, rec, x = _run_probe(module, shape, dtype, seed)
                _digest_derived(rec, param_ids)  # before the next probe allocates its own copy
                runs.append((shape, out, rec, x))
                del out, rec, x
            break
        except Exception as exc:  # noqa: BLE001 - a wrong guess of the input shape raises anything
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if runs is None:
        reason = "could not be run on a probe input" + (f" ({errors[0]})" if errors else "")
        return SkippedLayer(name, type_name, reason)

    observed = _observe_runs(name, type_name, runs, param_ids)
    probe_shape = runs[0][0]
    del runs  # each run holds a copy of a possibly large derived weight
    if observed is None or isinstance(observed, SkippedLayer):
        return observed
    call, pad_spec = observed
    del observed
    geometry = _geometry(call)
    w0 = call.args["weight"]
    bias = call.args.get("bias")
    op_name = call.op
    del call

    # Where does the weight come from: the raw tensor of the same shape among the layer's own tensors.
    raw_name, raw = next(
        ((k, t) for k, t in own.items() if t.shape == w0.shape and t.is_floating_point()), (None, None)
    )
    bias_param = next((k for k, t in own.items() if t is bias), None) if bias is not None else None
    formula = misfit = None
    if raw is not None:
        per_channel = {
            k: t
            for k, t in own.items()
            if k not in (raw_name, bias_param) and t.is_floating_point() and t.numel() == w0.shape[0]
        }
        scalars, eps_hints = _scalar_attributes(module)
        # Score formulas on a subset of channels, then check the winner on all of them. Only that subset of the
        # observed weight is held while the designed probes run, so a huge layer is never held three times.
        keep = channel_subset(raw.shape[0])
        observations = [(raw[keep], w0.subset)]
        del w0
        for designed in designed_weights(raw):
            captured = _derived_weight_of(module, probe_shape, dtype, param_ids, {raw_name: designed})
            if captured is not None and captured.shape == raw.shape:
                observations.append((designed[keep], captured[keep].clone()))
            del designed, captured
        found = identify_formula(
            observations, {k: v.reshape(-1)[keep] for k, v in per_channel.items()}, scalars, eps_hints
        )
        w0 = _derived_weight_of(module, probe_shape, dtype, param_ids)
        if found:
            f = found[0]
            full = formula_misfit(raw, w0, f, *f.affine_tensors(per_channel))
            found = (f, full) if full <= tolerance(w0.dtype) else None
        if found:
            formula, misfit = found
    if isinstance(w0, _WeightDigest):
        w0 = _derived_weight_of(module, probe_shape, dtype, param_ids)
    fan_in = int(w0[0].numel())
    layer = DerivedLayer(
        name=name,
        type=type_name,
        op=op_name,
        geometry=geometry,
        weight_shape=tuple(w0.shape),
        dtype=w0.dtype,
        source_param=raw_name or "",
        formula=formula,
        misfit=misfit,
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
    elif bias is not None and bias_param is None:
        layer.observed_bias = bias.detach().clone()
    if fan_in < 16:
        layer.warnings.append(f"fan-in {fan_in} < 16: statistics from {fan_in} numbers")
    if formula is not None and raw is not None:
        low = sum(
            int((channel_stats(raw[i : i + 256], torch.float32)[1] < formula.eps).sum())
            for i in range(0, raw.shape[0], 256)
        )
        if low:
            layer.warnings.append(f"{low} filter(s) with variance below eps={formula.eps:g}")
    if raw is None:
        layer.warnings.append("no parameter of the weight's shape: the observed weight is baked as is")
    return layer


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


def detect_layers(model: nn.Module, progress: Callable[[int, int], None] | None = None) -> Detection:
    """Probe every candidate module of ``model`` and report the ones with a derived weight. Never mutates ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers(remove_duplicate=False))
    candidates = [(n, m) for n, m in model.named_modules() if _is_candidate(m)]
    layers: list[DerivedLayer] = []
    unsupported: list[SkippedLayer] = []
    unprobed: list[SkippedLayer] = []
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for i, (name, module) in enumerate(candidates):
            result = _analyse(name, module, params)
            if isinstance(result, DerivedLayer):
                layers.append(result)
            elif isinstance(result, SkippedLayer):
                (unprobed if result.reason.startswith("could not be run") else unsupported).append(result)
            if progress:
                progress(i + 1, len(candidates))
    finally:
        for m, t in was_training.items():
            m.training = t
    # A layer inside an unsupported one must not be baked on its own: the parent's math would be split.
    blocked = [u.name for u in unsupported]
    layers = [l for l in layers if not any(l.name.startswith(b + ".") for b in blocked if b)]
    return Detection(layers, unsupported, unprobed)
