"""Find layers whose convolution or linear op receives a derived weight, by running each layer alone.

Detection observes behaviour: each candidate module is called on small probe inputs at its own dtype (probe.py)
while the weight, bias and geometry handed to conv*/conv_transpose*/linear and any F.pad applied first are
recorded. A class name only gives the layer a friendly name in the report.
"""

from __future__ import annotations

import inspect as _inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import first_line
from ..io.memory import FilePages, file_mappings
from .findings import KNOWN_CLASSES, DerivedLayer, Detection, Finding, PadSpec, SkippedLayer, _unprobed, add_finding
from .formulas import (
    Formula,
    Rounded,
    channel_subset,
    const_value,
    designed_weights,
    identify_formula,
    standardize_rounded,
    tolerance,
)
from .modeltree import eval_mode, require_module
from .modules import tf_same_pad
from .probe import OpCall, ProbeRun, TensorSet, as_tuple, own_tensors, probe_shapes, run_probe

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


def _is_candidate(module: nn.Module) -> bool:
    if hasattr(module, "parametrizations"):
        return True
    if type(module) in _PLAIN_TYPES or isinstance(module, torch.nn.utils.parametrize.ParametrizationList):
        return False
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    # Any other module that owns a floating tensor of rank >= 2 may derive a weight from it, children or not
    # (mmcv's SAConv2d owns the weight it standardizes and has parameterized children): each one is probed and
    # ends as derived, unsupported or not probed, never skipped without a word.
    tensors = [t for t in own_tensors(module).values() if t.is_floating_point() and t.ndim >= 2]
    if tensors and next(module.children(), None) is not None and all(t.shape[0] == 1 for t in tensors):
        # A container's (1, tokens, dim) position embedding or (1, 1, dim) class token: not a layer's weight.
        return False
    return bool(tensors)


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
        """Equal digests; NaN counts as equal to NaN (a weight holding NaN is still the same weight)."""
        if self.shape != other.shape or self.subset.shape != other.subset.shape:
            return False
        a, b = self.subset, other.subset
        same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
        sums = all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(self.sums, other.sums))
        return bool(same.all()) and sums


def _digest_derived(run: ProbeRun, params: TensorSet, keep: bool = False) -> None:
    """Replace each derived weight the run recorded by its digest (the whole tensor kept only with ``keep``)."""
    for call in run.ops:
        w = call.args.get("weight")
        if isinstance(w, torch.Tensor) and w not in params:
            call.args["weight"] = _WeightDigest(w, keep)


def _derived_weight_of(
    module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, params: TensorSet, overrides=None
) -> torch.Tensor | None:
    """The derived weight the module hands to its op on one probe (with ``overrides`` substituted)."""
    calls = [c for c in run_probe(module, shape, dtype, 0, overrides).ops if c.args["weight"] not in params]
    return calls[0].args["weight"] if len(calls) == 1 else None


def _derived_calls(run: ProbeRun) -> list[OpCall]:
    return [c for c in run.ops if isinstance(c.args["weight"], _WeightDigest)]


def _observe_runs(
    name: str, type_name: str, runs: list[ProbeRun]
) -> tuple[OpCall, PadSpec | None] | SkippedLayer | None:
    """From two probe runs at different input sizes (derived weights digested): the single derived-weight op call
    (of the first run) and its padding, a SkippedLayer saying why the module is not [pad] + one op, or None if
    nothing is derived."""
    derived = [_derived_calls(run) for run in runs]
    if not derived[0]:
        return None

    def skip(reason: str) -> SkippedLayer:
        return SkippedLayer(name, type_name, reason)

    if any(len(d) != len(derived[0]) for d in derived):
        return skip("calls a different number of ops for different inputs")
    if len(runs[0].ops) > 1:
        ops_list = ", ".join(c.op for c in runs[0].ops)
        return skip(f"calls {len(runs[0].ops)} ops ({ops_list}) with derived weights; it is not one plain op")
    call = derived[0][0]
    for other in (d[0] for d in derived[1:]):
        if not other.args["weight"].same_as(call.args["weight"]):
            return skip("its weight depends on the input; it cannot become a constant")
        b_a, b_b = call.args.get("bias"), other.args.get("bias")
        if (b_a is None) != (b_b is None) or (b_a is not None and not torch.equal(b_a, b_b)):
            return skip("its bias depends on the input; it cannot become a constant")
        if other.geometry() != call.geometry():
            return skip("its stride/padding/groups change with the input size")

    # The module must be nothing but [pad] + op: its output is the op's output, the op's input is the
    # module's input (directly or through one F.pad of it).
    pads_per_run = []
    for run, calls in zip(runs, derived):
        c, out = calls[0], run.output
        if out is not c.output and not (
            isinstance(out, torch.Tensor) and out.shape == c.output.shape and torch.equal(out, c.output)
        ):
            return skip("does more than one op (its output is not the op's output)")
        inp = c.args["input"]
        if inp is run.input:
            pads_per_run.append(None)
            continue
        pad_calls = [p for p in run.calls if p.op == "pad" and p.output is inp]
        if not pad_calls or pad_calls[0].args["input"] is not run.input:
            return skip("transforms its input before the op in a way other than padding")
        p = pad_calls[0].args
        mode = p.get("mode", "constant") or "constant"
        pads_per_run.append((mode, float(p.get("value") or 0.0), tuple(int(v) for v in p["pad"]), run.shape))
    if all(p is None for p in pads_per_run):
        return call, None
    if any(p is None for p in pads_per_run) or len({(p[0], p[1]) for p in pads_per_run}) > 1:
        return skip("pads its input differently for different input sizes")
    mode, value = pads_per_run[0][0], pads_per_run[0][1]
    if len({p[2] for p in pads_per_run}) == 1:
        return call, PadSpec(mode, value, pads_per_run[0][2])
    w = call.args["weight"]
    nd = w.ndim - 2
    geometry = call.geometry()
    k, s, d = tuple(w.shape[2:]), as_tuple(geometry["stride"], nd), as_tuple(geometry["dilation"], nd)
    if mode == "constant" and all(tf_same_pad(p[3][2:], k, s, d) == p[2] for p in pads_per_run):
        return call, PadSpec(mode, value, None, same_dynamic=True)
    return skip("pads its input by an amount that depends on the input size and is not TF-SAME")


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


@dataclass
class _Observed:
    """What the real probes of one module showed: its op call (derived weight digested, the first probe's kept
    whole), its padding, and which probe input fits it."""

    call: OpCall
    pad: PadSpec | None
    probe_shape: tuple[int, ...]
    shape_index: int

    @property
    def weight(self) -> torch.Tensor:
        return self.call.args["weight"].tensor


class _Prober:
    """Analyses candidate modules one at a time.

    The first module of each signature is probed fully: two real probes at different input sizes (padding and
    input dependence), then designed weights that separate formulas the real weight cannot. A later module of
    the same signature is run once on its real weight and accepted only when the formula of the same form,
    evaluated in float64, reproduces on every channel what its own code computed; anything else sends it
    through the full probes too. Either way every layer's own output is checked whole."""

    def __init__(
        self,
        params: TensorSet,
        exact_weights: bool,
        weight_dtype: torch.dtype | None = None,
        reuse_observed: bool = False,
    ) -> None:
        self.params = params
        self.exact_weights = exact_weights
        self.weight_dtype = weight_dtype
        self.reuse_observed = reuse_observed
        self.learned: dict[tuple, _Learned] = {}
        # Where the model's tensors may be file-backed (see FilePages): read once, not once per layer.
        self.mappings = file_mappings() if exact_weights else []

    def analyse(self, name: str, module: nn.Module) -> Finding | None:
        own = own_tensors(module)
        weights = [t for t in own.values() if t.is_floating_point() and t.ndim >= 2]
        if not weights:
            return Finding(SkippedLayer(name, type(module).__name__, "could not be run on a probe input"))
        largest = max(weights, key=lambda t: t.numel())
        scalars, eps_hints = _scalar_attributes(module)
        signature = _signature(module, own, scalars)
        learned = self.learned.get(signature) if signature is not None else None
        if learned is not None:
            found = self._quick(name, module, own, largest, scalars, learned)
            if found is not None:
                return found
        found, learned = self._full(name, module, own, largest, scalars, eps_hints)
        if signature is not None and learned is not None:
            self.learned.setdefault(signature, learned)
        return found

    def _quick(self, name, module, own, largest, scalars, learned: _Learned) -> Finding | None:
        """The layer checked against a formula learned on another module of its signature; None: probe fully."""
        shapes = probe_shapes(module, tuple(largest.shape))
        if learned.shape_index >= len(shapes):
            return None
        try:
            run = run_probe(module, shapes[learned.shape_index][0], largest.dtype, 0)
        except Exception:  # noqa: BLE001 - then the full probes decide
            return None
        if len(run.ops) != 1 or len(run.calls) != 1:
            return None
        call = run.ops[0]
        w0, bias = call.args.get("weight"), call.args.get("bias")
        raw = own.get(learned.raw_name)
        if not isinstance(w0, torch.Tensor) or w0 in self.params or raw is None or raw.shape != w0.shape:
            return None
        if run.output is not call.output or call.args["input"] is not run.input:
            return None
        bias_param = _param_name(own, bias)
        if bias_param != learned.bias_param or (bias is not None and bias_param is None):
            return None  # a computed bias needs the second probe (does it depend on the input?)
        try:
            n = int(w0[0].numel())
            formula = replace(learned.formula, scale_const=const_value(learned.formula.scale_const_name, scalars, n))
        except KeyError:
            return None
        # The exact weight may take the place of the observed one, which nothing else holds: a misfit here
        # sends the module through the full probes, which observe it afresh.
        reuse = self.reuse_observed and self.exact_weights and _private_result(w0, module, self.params)
        rounded = _round(
            own,
            raw,
            formula,
            learned.raw_name,
            bias_param,
            w0,
            self.exact_weights,
            self.weight_dtype,
            into_observed=reuse,
            mappings=self.mappings,
        )
        if rounded is None:
            return None
        found = _finding(name, module, call, w0, None, learned.raw_name, bias_param, formula, rounded)
        found.result.probed_as = learned.layer
        return found

    def _full(self, name, module, own, largest, scalars, eps_hints) -> tuple[Finding | None, _Learned | None]:
        observed = self._observe(name, module, largest)
        if not isinstance(observed, _Observed):
            return (None if observed is None else Finding(observed)), None
        call, w0 = observed.call, observed.weight
        bias = call.args.get("bias")
        # Where does the weight come from: the raw tensor of the same shape among the layer's own tensors.
        raw_name = next((k for k, t in own.items() if t.shape == w0.shape and t.is_floating_point()), None)
        bias_param = _param_name(own, bias)
        formula = rounded = None
        if raw_name is not None:
            formula = _identify(module, own, raw_name, bias_param, observed, scalars, eps_hints, self.params)
            rounded = (
                None
                if formula is None
                else _round(
                    own,
                    own[raw_name],
                    formula,
                    raw_name,
                    bias_param,
                    w0,
                    self.exact_weights,
                    self.weight_dtype,
                    mappings=self.mappings,
                )
            )
            formula = formula if rounded is not None else None
        found = _finding(name, module, call, w0, observed.pad, raw_name, bias_param, formula, rounded)
        clean = formula is not None and observed.pad is None and raw_name is not None and (bias is None or bias_param)
        learned = _Learned(name, observed.shape_index, raw_name, bias_param, formula) if clean else None
        return found, learned

    def _observe(self, name: str, module: nn.Module, largest: torch.Tensor) -> _Observed | SkippedLayer | None:
        """Two real probes at different input sizes, on the first input shape the module accepts."""
        errors = []
        for index, shapes in enumerate(probe_shapes(module, tuple(largest.shape))):
            runs = []
            try:
                for seed, shape in enumerate(shapes):
                    run = run_probe(module, shape, largest.dtype, seed)
                    # Only the first probe's derived weight is kept whole; later ones are digested at once.
                    _digest_derived(run, self.params, keep=seed == 0)
                    runs.append(run)
            except Exception as exc:  # noqa: BLE001 - a wrong guess of the input shape raises anything
                errors.append(f"{type(exc).__name__}: {first_line(exc)}")
                continue
            observed = _observe_runs(name, type(module).__name__, runs)
            if observed is None or isinstance(observed, SkippedLayer):
                return observed
            return _Observed(observed[0], observed[1], runs[0].shape, index)
        reason = "could not be run on a probe input" + (f" ({errors[0]})" if errors else "")
        return SkippedLayer(name, type(module).__name__, reason)


def _identify(
    module, own, raw_name, bias_param, observed: _Observed, scalars, eps_hints, params: TensorSet
) -> Formula | None:
    """Score formulas on a subset of channels of the real weight and of designed ones; the best candidate."""
    raw = own[raw_name]
    per_channel = _per_channel(own, raw.shape[0], raw_name, bias_param)
    keep = channel_subset(raw.shape[0])
    observations = [(raw[keep], observed.call.args["weight"].subset)]
    for designed in designed_weights(raw):
        captured = _derived_weight_of(module, observed.probe_shape, raw.dtype, params, {raw_name: designed})
        if captured is not None and captured.shape == raw.shape:
            observations.append((designed[keep], captured[keep].clone()))
        del designed, captured
    found = identify_formula(observations, {k: v.reshape(-1)[keep] for k, v in per_channel.items()}, scalars, eps_hints)
    return found


def _round(
    own,
    raw,
    formula: Formula,
    raw_name,
    bias_param,
    observed: torch.Tensor,
    exact_weights: bool,
    weight_dtype: torch.dtype | None = None,
    into_observed: bool = False,
    mappings: list[tuple[int, int]] | None = None,
) -> Rounded | None:
    """The formula in float64 over the whole weight, checked element by element against what the layer's own
    code computed; None when they differ by more than rounding noise. With ``into_observed`` the exact weight is
    written over the observed one, which then holds neither whole if None is returned."""
    per_channel = _per_channel(own, raw.shape[0], raw_name, bias_param)
    scale, shift = formula.affine_tensors(per_channel)
    if (formula.scale_tensor and scale is None) or (formula.shift_tensor and shift is None):
        return None
    # When baking, a memory-mapped source weight's pages are handed back as soon as they have been read for
    # the last time (the baked layer replaces it).
    done = FilePages(raw, mappings).release if exact_weights else None
    dtype = weight_dtype or observed.dtype
    rounded = standardize_rounded(
        raw,
        formula,
        scale,
        shift,
        dtype=dtype,
        observed=observed,
        keep=exact_weights,
        done_rows=done,
        out=observed if into_observed and exact_weights and dtype == observed.dtype else None,
    )
    return rounded if rounded.misfit <= tolerance(observed.dtype) else None


def _finding(name, module, call, w0, pad_spec, raw_name, bias_param, formula, rounded) -> Finding:
    bias = call.args.get("bias")
    fan_in = int(w0[0].numel())
    type_name = type(module).__name__
    layer = DerivedLayer(
        name=name,
        type=type_name,
        op=call.op,
        geometry=call.geometry(),
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
        if bias is not None and bias_param is None:
            layer.observed_bias = bias.detach().clone()
        low = int((rounded.var_b < formula.eps).sum())
        if low:
            layer.warnings.append(f"{low} filter(s) with variance below eps={formula.eps:g}")
    if rounded is not None and rounded.observed_nonfinite is not None:
        layer.nonfinite = rounded.observed_nonfinite  # counted on the way (w0 may hold the rounded weight now)
    else:
        layer.nonfinite = int((~torch.isfinite(w0)).sum()) if w0.is_floating_point() else 0
    if layer.nonfinite:
        stored = own_tensors(module).get(raw_name) if raw_name else None
        bad = int((~torch.isfinite(stored)).sum()) if stored is not None else 0
        cause = (
            f"{bad} in the stored {raw_name}" if bad else "the stored weight is finite (eps 0 on a constant filter?)"
        )
        layer.warnings.append(f"non-finite: the weight it computes holds {layer.nonfinite} NaN/inf value(s) ({cause})")
    if fan_in < 16:
        layer.warnings.append(f"fan-in {fan_in} < 16: statistics from {fan_in} numbers")
    if not raw_name:
        layer.warnings.append("no parameter of the weight's shape: the observed weight is baked as is")
    return Finding(layer, rounded.weight if rounded is not None else None)


def _private_result(tensor: torch.Tensor, module: nn.Module, params: TensorSet) -> bool:
    """Whether ``tensor``, computed by ``module``'s own code, is a plain contiguous tensor filling a storage
    that no parameter or buffer of the model shares, nor any tensor the module tree keeps in an attribute (a
    cached weight): one that may be written over once it has been read."""
    if type(tensor) is not torch.Tensor or not tensor.is_contiguous() or tensor.storage_offset() != 0:
        return False
    storage = tensor.untyped_storage()
    if storage.nbytes() != tensor.numel() * tensor.element_size() or tensor.numel() == 0:
        return False
    ptr = storage.data_ptr()
    if params.holds_storage(ptr):
        return False
    for m in module.modules():
        for value in vars(m).values():
            held = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr for t in held):
                return False
    return True


def _param_name(own: dict[str, torch.Tensor], tensor: torch.Tensor | None) -> str | None:
    """The name under which the module owns ``tensor`` (None for a computed tensor, or no tensor)."""
    return None if tensor is None else next((k for k, t in own.items() if t is tensor), None)


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


def iter_layers(
    model: nn.Module,
    *,
    exact_weights: bool = False,
    weight_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    reuse_observed: bool = False,
) -> Iterator[Finding]:
    """Probe every candidate module of ``model`` and yield a Finding for each layer with a derived weight and each
    module that cannot be baked or run. Never changes ``model`` (probing runs it in eval mode, every flag restored).

    With ``exact_weights``, each derived layer comes with its exact weight, so that a caller can bake it before
    the next layer is probed (rounded once to ``weight_dtype``, default the layer's own); a memory-mapped source
    weight's pages are then handed back once read. A module
    inside one yielded as derived or unsupported is not probed on its own: the parent's math would be split.
    ``reuse_observed`` lets an exact weight be written over the weight the layer's own code computed, when no
    tensor of the model shares that memory (for a caller that may change the model: it saves a fresh tensor
    the size of the layer)."""
    require_module(model, "iter_layers")
    params = TensorSet(model)
    # Names, not module objects: a layer baked on the way must not be kept alive by this loop.
    candidates = [n for n, m in model.named_modules() if _is_candidate(m)]
    prober = _Prober(params, exact_weights, weight_dtype, reuse_observed)
    claimed: list[str] = []
    with eval_mode(model):
        for i, name in enumerate(candidates):
            if not any(name.startswith(c + ".") or c == "" for c in claimed):
                found = prober.analyse(name, model.get_submodule(name))
                if found is not None:
                    if isinstance(found.result, DerivedLayer) or not _unprobed(found.result):
                        claimed.append(name)
                    yield found
                del found
            if progress:
                progress(i + 1, len(candidates))


def detect_layers(model: nn.Module, progress: Callable[[int, int], None] | None = None) -> Detection:
    """Probe every candidate module of ``model`` and report the ones with a derived weight. Never mutates ``model``."""
    detection = Detection([], [], [])
    for found in iter_layers(model, progress=progress):
        add_finding(detection, found.result)
    return detection
