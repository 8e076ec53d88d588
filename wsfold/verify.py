"""Prove with onnxruntime that an ONNX graph computes what the original checkpoint computes.

Pass rule (default): for every output and sample, let R be the original model at its own dtype, R64 the same
model evaluated in float64, O the ONNX output. The graph passes when |O - R64|max <= 4 * |R - R64|max +
8 * u * |R64|max, u the unit roundoff of the dtype: the deployed graph may not be markedly less accurate than
the original model is in its own precision. --atol/--rtol replace it with allclose(O, R, atol, rtol).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .errors import VerifyInputError, first_line
from .inputs import ValueRange, per_input, random_array
from .layer_check import LayerCheck, compare_layers
from .memory import release_file_pages, released_after_call, trim_heap
from .modeltree import (
    default_dtype,
    model_dtype,
    require_module,
    set_eval,
    set_submodule,
    structural_copy,
    widened_on_call,
)
from .probe import own_tensors, probe_shapes, run_probe

if TYPE_CHECKING:
    from .detect import Detection
    from .pipeline import Prepared

ORT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
SAFETY = 4.0
MAX_SAMPLES = 10_000
FLOOR_ULPS = 8.0
_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


@dataclass
class OutputCheck:
    """The worst figures for one output over all samples."""

    index: int
    name: str
    reference_name: str
    shape: list[int]
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mean_abs_error: float = 0.0
    worst_index: list[int] = field(default_factory=list)
    onnx_vs_float64: float = 0.0
    reference_vs_float64: float = 0.0
    allowed: float = 0.0
    passed: bool = True
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    judged_per: str = "tensor"  # "channel" when each output channel was held to its own scale
    has_channels: bool = True  # dim 1 holds channels (N, C, ...): a convolution's output, not rows of a map
    compared: bool = False  # whether any batch's values were compared (not when shapes or counts differ)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "index"}

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


@dataclass
class VerificationResult:
    """``bool(result)`` is whether the graph passed; ``str(result)`` states the criterion and the worst figures."""

    criterion: str
    samples: int
    outputs: list[OutputCheck]
    layers: list[LayerCheck] = field(default_factory=list)
    layers_unpaired: list[str] = field(default_factory=list)  # baked layers no op of the graph takes
    layers_compared: int = 0  # baked layers looked for in the graph (0: the per-layer check did not run)
    foreign: bool = False  # the outputs differ and no layer of SOURCE's model is in the graph
    ort_opt_level: str = "all"
    cause: str | None = None
    hint: str | None = None
    input_shapes: list[list[int]] = field(default_factory=list)  # each input's shape in the first batch
    batch_input_shapes: list[list[list[int]]] = field(default_factory=list)  # the same for every batch run
    reference: str = ""  # what the graph was compared against
    reference_sha256: str | None = None  # the whole sha256 of SOURCE's file (None: a model or a directory)
    notes: list[str] = field(default_factory=list)  # warnings that are not about one output

    @property
    def warnings(self) -> list[str]:
        return self.notes + [f"{o.name}: {w}" for o in self.outputs for w in o.warnings]

    @property
    def passed(self) -> bool:
        outputs = all(o.passed for o in self.outputs)
        return outputs and not self.foreign and all(layer.passed for layer in self.layers)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [f"{'PASSED' if self.passed else 'FAILED'} ({self.criterion}; {self.samples} sample(s))"]
        for o in self.outputs:
            lines.append(
                f"  {o.name}: max abs {o.max_abs_error:.3g}, onnx-vs-float64 {o.onnx_vs_float64:.3g} "
                f"<= {o.allowed:.3g}: {'ok' if o.passed else 'FAIL ' + '; '.join(o.problems)}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "criterion": self.criterion,
            "samples": self.samples,
            "ort_opt_level": self.ort_opt_level,
            "input_shapes": self.input_shapes,
            "batch_input_shapes": self.batch_input_shapes,
            "outputs": [o.to_dict() for o in self.outputs],
            "layers": [layer.to_dict() for layer in self.layers],
            "layers_compared": self.layers_compared,
            "layers_unpaired": self.layers_unpaired,
            "foreign_graph": self.foreign,
            "cause": self.cause,
            "hint": self.hint,
            "reference": self.reference,
            "reference_sha256": self.reference_sha256,
            "warnings": self.warnings,
        }


def check_onnx_file(path: str | Path) -> Path:
    """``path`` as a Path, once it is known to hold an ONNX graph: a missing file, something else than a file, or
    a file that does not parse as an ONNX model with a graph is a VerifyInputError, said before any other work.
    Only the graph's structure is read (see onnx_store.load_without_weights)."""
    from google.protobuf.message import DecodeError

    from .onnx_store import load_without_weights

    path = Path(path)
    if not path.exists():
        raise VerifyInputError(f"{path}: no such ONNX file.", "run `wsfold export SOURCE --onnx PATH` first.")
    if not path.is_file():
        raise VerifyInputError(f"{path} is not a file.", "pass the .onnx file that `wsfold export` wrote.")
    try:
        proto = load_without_weights(path)
    except (OSError, ValueError, DecodeError, RecursionError) as exc:
        raise VerifyInputError(
            f"{path} is not an ONNX model ({first_line(exc)}).", "pass the .onnx file that `wsfold export` wrote."
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise VerifyInputError(f"{path} holds no ONNX graph.", "pass the .onnx file that `wsfold export` wrote.")
    return path


def ort_session(path: Path, level: str = "all"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    opts.log_severity_level = 4  # fatal only: an error is reported once, by us, on one line
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        hint = "re-export it with `wsfold export`."
        if "NOT_IMPLEMENTED" in str(exc):
            hint = (
                "the graph uses an op at a type onnxruntime's CPU provider does not run (a float64 Conv?): "
                "re-export it with `wsfold export --dtype float32`."
            )
        raise VerifyInputError(f"onnxruntime cannot load {path} ({first_line(exc)}).", hint) from None


def float64_reference(model: nn.Module, detection: Detection) -> tuple[nn.Module, list[str]]:
    """A copy of the original model that computes, in float64, the same function as at its own dtype. It shares
    the model's tensors and is run with ``widened_on_call`` (see _References): no float64 copy of the whole
    model is made unless its code needs one.

    A layer whose math depends on the input dtype (eps 1e-5 for float32, 1e-3 otherwise) would compute another
    function in float64: such layers get their weight from the formula observed at the model's dtype instead.
    Returns the copy and the names of the layers so replaced.
    """
    from .bake import build_plain
    from .formulas import standardize_rounded

    model64 = set_eval(structural_copy(model))
    replaced = []
    for layer in detection.layers:
        module = model.get_submodule(layer.name) if layer.name else model
        module64 = model64.get_submodule(layer.name) if layer.name else model64
        expected = None
        if layer.formula is not None:
            own = own_tensors(module)
            # In blocks, into one float64 tensor: the whole-layer formula would hold several at once.
            raw = own[layer.source_param]
            scale, shift = layer.formula.affine_tensors(own)
            expected = standardize_rounded(raw, layer.formula, scale, shift, dtype=torch.float64).weight
        try:
            with widened_on_call(module64):
                run = run_probe(module64, probe_shapes(module64, layer.weight_shape)[0][0], torch.float64, 0)
            got = run.ops[0].args["weight"]
        except Exception:  # noqa: BLE001 - fall back to the observed formula
            got = None
        release_file_pages(module)  # its checkpoint weights, read here, need not stay resident
        reference = expected if expected is not None else layer.observed_weight.double()
        tol = 1e-9 if expected is not None else 64 * torch.finfo(layer.dtype).eps
        if got is not None and got.shape == reference.shape:
            if float(torch.dist(got, reference, p=float("inf"))) <= tol * float(reference.abs().max()):
                continue
        plain_layer = copy.copy(layer)
        plain_layer.dtype = torch.float64
        new, _ = build_plain(module, plain_layer)
        model64 = set_submodule(model64, layer.name, new.double())
        replaced.append(layer.name)
    return model64, replaced


def _compare(
    o: np.ndarray,
    r: torch.Tensor,
    r64: torch.Tensor,
    check: OutputCheck,
    rule,
    unit: float,
    r_graph: torch.Tensor | None = None,
) -> None:
    """Fold one output of one sample into ``check``. The rule measures the original's own error on ``r_graph``
    (the checkpoint's math at the graph's precision) when given, else on ``r``."""
    if list(o.shape) != list(r.shape):
        check.passed = False
        if not any(p.startswith("shape ") for p in check.problems):  # said once, for the first batch
            check.problems.append(f"shape {list(o.shape)} in the ONNX graph vs {list(r.shape)} in the checkpoint")
        return
    check.compared = True
    o64 = torch.from_numpy(np.asarray(o)).double()
    r32 = r.detach().double()
    ref64 = r64.detach().double()
    overflow = ~torch.isfinite(r32) & torch.isfinite(ref64)
    if bool(overflow.any()):
        raise VerifyInputError(
            f"the checkpoint's own model computes NaN/inf at {str(r.dtype).removeprefix('torch.')} on these inputs "
            f"({int(overflow.sum())} value(s) of {check.reference_name!r}, finite in float64): nothing can be "
            "compared there.",
            "narrow --input-range, or give real data with --inputs.",
        )
    if not bool(torch.isfinite(o64).all()):
        bad = ~torch.isfinite(o64) & torch.isfinite(r32)
        if bool(bad.any()):
            check.passed = False
            idx = [int(v) for v in np.unravel_index(int(bad.reshape(-1).nonzero()[0]), tuple(o.shape))]
            check.problems.append(f"NaN/Inf in the ONNX output at {idx} where the checkpoint's output is finite")
            return
    diff = (o64 - r32).abs()
    diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if max_abs >= check.max_abs_error:
        check.max_abs_error = max_abs
        check.shape = list(o.shape)  # the batch worst_index points into
        if diff.numel():
            check.worst_index = [int(v) for v in np.unravel_index(int(diff.argmax()), tuple(diff.shape))]
    denom = torch.clamp(r32.abs(), min=1e-3 * scale if scale > 0 else 1e-30)
    check.max_rel_error = max(check.max_rel_error, float((diff / denom).max()) if diff.numel() else 0.0)
    check.mean_abs_error = max(check.mean_abs_error, float(diff.mean()) if diff.numel() else 0.0)
    e_onnx = float((o64 - ref64).abs().max()) if diff.numel() else 0.0
    e_ref = float((r32 - ref64).abs().max()) if diff.numel() else 0.0
    check.onnx_vs_float64 = max(check.onnx_vs_float64, e_onnx)
    check.reference_vs_float64 = max(check.reference_vs_float64, e_ref)
    if ref64.numel() and scale == 0.0:
        check.warn("the checkpoint's output is all zero on these inputs: agreement on it proves little")
    elif ref64.numel() > 1 and float(ref64.max() - ref64.min()) == 0.0:
        check.warn("the checkpoint's output is constant on these inputs: agreement on it proves little")
    ok, allowed, what = rule(o64, r32 if r_graph is None else r_graph.detach().double(), ref64, unit, check)
    check.allowed = max(check.allowed, allowed)
    if not ok:
        check.passed = False
        check.problems.append(what)


# Below this many values a channel's own float32 error is too noisy an estimate: the output is judged whole.
MIN_CHANNEL_VALUES = 64


def _by_channel(t: torch.Tensor) -> torch.Tensor:
    """(channels, values): dim 1 of a batched output as the channels."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _default_rule(o64, r32, ref64, unit, check):
    """|onnx - float64| <= SAFETY * |original - float64| + FLOOR ulp of the scale, per output channel when the
    channels are large enough to estimate their own error (so that a channel of small scale cannot hide an
    error behind a channel of large scale), else over the whole output."""
    e_onnx = float((o64 - ref64).abs().max()) if o64.numel() else 0.0
    e_ref = float((r32 - ref64).abs().max()) if o64.numel() else 0.0
    scale = float(ref64.abs().max()) if o64.numel() else 0.0
    allowed = SAFETY * e_ref + FLOOR_ULPS * unit * scale
    too_few = o64.ndim < 2 or o64.shape[1] < 2 or o64.numel() // o64.shape[1] < MIN_CHANNEL_VALUES
    if too_few or not check.has_channels:
        return (
            e_onnx <= allowed,
            allowed,
            f"ONNX error vs float64 {e_onnx:.3g} exceeds {allowed:.3g} (original's own error {e_ref:.3g})",
        )
    check.judged_per = "channel"
    err_c = _by_channel((o64 - ref64).abs()).amax(dim=1)
    ref_c = _by_channel((r32 - ref64).abs()).amax(dim=1)
    scale_c = _by_channel(ref64.abs()).amax(dim=1)
    # A channel may always err as much as its share of the whole output's error (its scale over the output's).
    share = e_ref * scale_c / scale if scale > 0 else torch.zeros_like(scale_c)
    allowed_c = SAFETY * torch.maximum(ref_c, share) + FLOOR_ULPS * unit * scale_c
    over = err_c - allowed_c
    worst = int(over.argmax())
    if float(over[worst]) <= 0:
        return True, allowed, ""
    return (
        False,
        allowed,
        f"channel {worst}: ONNX error vs float64 {float(err_c[worst]):.3g} exceeds {float(allowed_c[worst]):.3g} "
        f"(channel scale {float(scale_c[worst]):.3g}, the original's own error there {float(ref_c[worst]):.3g})",
    )


def _allclose_rule(atol: float, rtol: float):
    def rule(o64, r32, ref64, unit, check):
        excess = (o64 - r32).abs() - (atol + rtol * r32.abs())
        worst = float(excess.max()) if excess.numel() else -1.0
        return worst <= 0, atol, f"not allclose(atol={atol:g}, rtol={rtol:g}): exceeds by up to {worst:.3g}"

    return rule


def sample_inputs(
    session,
    shapes: list[tuple[int, ...]] | None,
    samples: int,
    seed: int,
    default_shape: tuple[int, ...] | None,
    value_ranges: list[ValueRange | None] | None = None,
    grow: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Seeded random inputs (see inputs.random_array, or ``value_ranges`` per input): each sample at batch 1 and
    (if the batch is dynamic) batch 3, and at two spatial sizes (the base, and ``grow`` more) when those are
    dynamic."""
    inputs = session.get_inputs()
    if shapes and len(shapes) != len(inputs):
        raise VerifyInputError(
            f"{len(shapes)} --input-shape given for a graph with {len(inputs)} input(s).", "give one per graph input."
        )
    ranges = per_input(value_ranges, len(inputs), "--input-range")
    for spec, value_range in zip(inputs, ranges):
        _check_range(spec, value_range)
    bases, dyn_batch, dyn_space = [], False, False
    for i, spec in enumerate(inputs):
        dims = list(spec.shape)
        if shapes:
            base = list(shapes[i])
        else:
            base = []
            for j, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    base.append(d)
                elif j == 0:
                    base.append(1)
                elif default_shape is not None and len(default_shape) == len(dims):
                    base.append(default_shape[j])
                else:
                    raise VerifyInputError(
                        f"input {spec.name!r} has dynamic dimension {j} ({d}) and no size is known.",
                        "pass --input-shape.",
                    )
        dyn_batch |= bool(dims) and not (isinstance(dims[0], int) and dims[0] > 0)
        dyn_space |= any(not (isinstance(d, int) and d > 0) for d in dims[2:])
        bases.append(base)
    variants = []
    for batch in [1, 3] if dyn_batch else [None]:
        for extra in [0, grow] if dyn_space and grow else [0]:
            variants.append((batch, extra))
    out = []
    for s in range(samples):
        for batch, extra in variants:
            gen = np.random.default_rng(seed + s)
            feed = {}
            for spec, base, value_range in zip(inputs, bases, ranges):
                dims = list(spec.shape)
                shape = list(base)
                if batch is not None:
                    shape[0] = batch
                for j in range(2, len(shape)):
                    if extra and not (isinstance(dims[j], int) and dims[j] > 0):
                        shape[j] += extra
                try:
                    feed[spec.name] = random_array(shape, _NP_DTYPES.get(spec.type, np.float32), gen, value_range)
                except (MemoryError, ValueError) as exc:
                    raise VerifyInputError(
                        f"input {spec.name!r} of shape {shape} cannot be made ({type(exc).__name__}: "
                        f"{first_line(exc)}).",
                        "use a smaller --input-shape.",
                    ) from None
            out.append(feed)
    return out


def _check_range(spec, value_range: ValueRange | None) -> None:
    """A --input-range whose values the input's dtype can hold (else the samples are inf, or wrap around)."""
    if value_range is None:
        return
    dtype = np.dtype(_NP_DTYPES.get(spec.type, np.float32))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        fits = info.min <= value_range.low and value_range.high <= float(info.max) + 1
    elif dtype.kind == "f":
        fits = max(abs(value_range.low), abs(value_range.high)) <= float(np.finfo(dtype).max)
    else:
        fits = True
    if not fits:
        raise VerifyInputError(
            f"--input-range {value_range} does not fit input {spec.name!r} ({dtype}).",
            f"give a range within {dtype}'s values.",
        )


def check_inputs_file(path: Path) -> None:
    """An --inputs file that can be read: said before any other work (a pipe would block the first read)."""
    if not path.exists():
        raise VerifyInputError(f"--inputs {path}: no such file.", "check the path.")
    if path.is_dir():
        raise VerifyInputError(f"--inputs {path} is a directory.", "pass one .npz or .pt file.")
    if not path.is_file():
        raise VerifyInputError(
            f"--inputs {path} is not a regular file (a pipe or a device?).", "save the inputs to a .npz file first."
        )


def load_inputs(path: Path, session) -> list[dict[str, np.ndarray]]:
    """Real data: .npz keyed by input name (arrays may hold several batches along dim 0), or .pt (a tensor or a
    dict of tensors)."""
    names = [i.name for i in session.get_inputs()]
    check_inputs_file(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        elif path.suffix in (".pt", ".pth"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not the user's concern here
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                obj = {names[0]: obj} if len(names) == 1 else {}
            arrays = {k: v.numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}
        else:
            raise VerifyInputError(
                f"--inputs {path}: unknown format {path.suffix!r}.", "use .npz keyed by input name, or .pt."
            )
    except VerifyInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise VerifyInputError(
            f"--inputs {path} is unreadable ({first_line(exc)}).", "write it with numpy.savez."
        ) from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise VerifyInputError(
            f"--inputs {path} has no array named {missing[0]!r} (it has: {', '.join(arrays) or 'nothing'}).",
            f"key the arrays by the graph's input names: {', '.join(names)}.",
        )
    types = {i.name: _NP_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
    for n in names:
        a = arrays[n]
        if a.dtype.kind not in "biuf":
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} holds {a.dtype} values, not numbers.", "store numeric arrays."
            )
        if a.size == 0:
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} is empty (shape {list(a.shape)}); nothing would be compared.",
                "store at least one sample (batch >= 1).",
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} holds {int((~np.isfinite(a)).sum())} NaN/inf value(s); the "
                "comparison would not be about the graph.",
                "store finite inputs.",
            )
    with np.errstate(over="ignore", invalid="ignore"):
        feed = {n: arrays[n].astype(types[n]) for n in names}
    for n, a in feed.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} overflows the graph's {a.dtype} ({int((~np.isfinite(a)).sum())} "
                "value(s) become inf).",
                "store inputs within the graph input's range.",
            )
    return [feed]


def _as_args(arrays: list[np.ndarray], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Feed arrays as model arguments: floating ones at ``dtype``, integer and bool ones as they are."""
    return tuple(
        torch.from_numpy(np.ascontiguousarray(a)).to(dtype) if a.dtype.kind == "f" else torch.from_numpy(a)
        for a in arrays
    )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, NaN equal to NaN (an overflow is the same on both runs; the overflow check reports it)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _evaluate(model: nn.Module, args: tuple[torch.Tensor, ...]):
    from .export import flatten_outputs

    try:
        with torch.no_grad():
            return flatten_outputs(model(*args))
    except Exception as exc:  # noqa: BLE001 - the user's model, on the user's shapes
        shapes = ", ".join(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args)
        raise VerifyInputError(
            f"the checkpoint's model cannot run on inputs {shapes} ({type(exc).__name__}: {first_line(exc)}).",
            "fix --input-shape, --input-range or --inputs (or the model's own code).",
        ) from None


@dataclass
class _References:
    """The checkpoint's model at its own dtype, in float64, and (for a graph of lower precision than the
    checkpoint) at the graph's dtype: what the checkpoint's own math gives at that precision."""

    model: nn.Module
    model64: nn.Module  # run widened on call, until a model's code needs a whole float64 copy (then it is one)
    at_graph_dtype: nn.Module | None = None
    graph_dtype: torch.dtype | None = None
    whole64: bool = False
    conv_outputs: set[str] = field(default_factory=set)  # the graph outputs a convolution computes

    def evaluate64(self, args: tuple[torch.Tensor, ...]):
        # What the model builds at torch's default dtype is built in float64 too, as its weights are.
        with default_dtype(torch.float64):
            if not self.whole64:
                try:
                    with widened_on_call(self.model64):
                        return _evaluate(self.model64, args)
                except VerifyInputError:
                    # Code that reads another module's weight without calling it: widen everything, once.
                    self.model64, self.whole64 = structural_copy(self.model64, torch.float64), True
            return _evaluate(self.model64, args)


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


def _run_checks(
    graph_outputs: list[list[np.ndarray]], refs: _References, feeds, input_names, rule, unit, onnx_names
) -> list[OutputCheck]:
    """The graph's outputs (computed before, without the checkpoint's model running) against the checkpoint's,
    feed by feed. Each module's memory-mapped weights are handed back once it has run: not all resident at once."""
    with released_after_call(refs.model, refs.model64):
        return _checks(graph_outputs, refs, feeds, input_names, rule, unit, onnx_names)


def _checks(graph_outputs, refs: _References, feeds, input_names, rule, unit, onnx_names) -> list[OutputCheck]:
    checks: list[OutputCheck] = []
    for feed, outs in zip(feeds, graph_outputs):
        arrays = [feed[name] for name in input_names]
        ref_names, ref = _evaluate(refs.model, _as_args(arrays, model_dtype(refs.model)))
        if not checks:
            _, again = _evaluate(refs.model, _as_args(arrays, model_dtype(refs.model)))
            if any(not _same_values(a, b) for a, b in zip(ref, again)):
                raise VerifyInputError(
                    "the checkpoint's model gives different outputs for the same input in eval mode (dropout "
                    "forced on? random noise in forward?): no graph can be compared with it.",
                    "make the model deterministic in eval mode.",
                )
        _, ref64 = refs.evaluate64(_as_args(arrays, torch.float64))
        ref_g = None
        if refs.at_graph_dtype is not None:
            _, ref_g = _evaluate(refs.at_graph_dtype, _as_args(arrays, refs.graph_dtype))
        if not checks:
            n = max(len(outs), len(ref))
            checks = [
                OutputCheck(
                    i,
                    onnx_names[i] if i < len(onnx_names) else "(missing)",
                    ref_names[i] if i < len(ref_names) else "(missing)",
                    [],
                    has_channels=i < len(outs) and (outs[i].ndim >= 4 or onnx_names[i] in refs.conv_outputs),
                )
                for i in range(n)
            ]
        for i, check in enumerate(checks):
            if i >= len(outs) or i >= len(ref):
                check.passed = False
                if not check.problems:
                    check.problems.append(
                        f"the ONNX graph has {len(outs)} output(s), the checkpoint's model {len(ref)}"
                    )
                continue
            check.shape = check.shape or list(outs[i].shape)
            _compare(outs[i], ref[i], ref64[i], check, rule, unit, None if ref_g is None else ref_g[i])
    return checks


def _check_feed(session, feed: dict[str, np.ndarray]) -> None:
    for spec in session.get_inputs():
        want, got = list(spec.shape), list(feed[spec.name].shape)
        fixed = [d if isinstance(d, int) and d > 0 else None for d in want]
        if len(fixed) != len(got) or any(f is not None and f != g for f, g in zip(fixed, got)):
            shown = ["N" if f is None else f for f in fixed]
            raise VerifyInputError(
                f"the ONNX graph takes input {spec.name!r} of shape {shown}, not {got}.",
                "fix --input-shape or --inputs to fit the graph (it may be another model's).",
            )


def verify_onnx(
    model: nn.Module | Prepared,
    onnx_path: str | Path,
    *,
    detection: Detection | None = None,
    samples: int = 3,
    seed: int = 0,
    input_shapes: list[tuple[int, ...]] | None = None,
    inputs_file: Path | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    ort_opt_level: str = "all",
    per_layer: bool = True,
    value_ranges: list[ValueRange | None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerificationResult:
    """Compare ``onnx_path`` with the original ``model`` (unbaked, as loaded from SOURCE), or with the original of
    a :func:`wsfold.prepare` result (whose detection and baked model are then reused). ``model`` is not changed.
    ``value_ranges``: per input, where random samples are drawn (see wsfold.inputs)."""
    from .detect import Detection, detect_layers
    from .export import declared_input_shape
    from .pipeline import Prepared

    prepared = model if isinstance(model, Prepared) else None
    if prepared is not None:
        if prepared.original is None:
            raise ValueError("verify_onnx needs the original model: call prepare(..., keep_original=True)")
        model, detection = prepared.original, prepared.detection
    require_module(model, "verify_onnx")
    if detection is not None and not isinstance(detection, Detection):
        raise TypeError(f"verify_onnx's detection must be a Detection, not {type(detection).__name__}")
    inputs_file = Path(inputs_file) if inputs_file is not None else None
    onnx_path = check_onnx_file(onnx_path)
    if inputs_file is not None:
        check_inputs_file(inputs_file)
    if ort_opt_level not in ORT_LEVELS:
        raise VerifyInputError(f"--ort-opt-level {ort_opt_level!r} is not one of {', '.join(ORT_LEVELS)}.", "use all.")
    if not 1 <= samples <= MAX_SAMPLES:
        raise VerifyInputError(f"--samples {samples} must be from 1 to {MAX_SAMPLES}.", "use --samples 3.")
    if not 0 <= seed < 2**63:
        raise VerifyInputError(f"--seed {seed} must be a non-negative integer below 2**63.", "use --seed 0.")
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise VerifyInputError(f"{flag} {value} must be a finite number >= 0.", f"use {flag} 1e-5.")
    if input_shapes and any(d <= 0 for shape in input_shapes for d in shape):
        raise VerifyInputError(f"--input-shape {input_shapes} has a dimension <= 0.", "use positive sizes.")
    if detection is None:
        detection = detect_layers(model)
    original = model
    model = set_eval(structural_copy(model))
    if progress:
        progress("float64 reference")
    model64, _ = float64_reference(model, detection)
    release_file_pages(original)  # read by detection and the reference: the session gets the memory
    session = ort_session(onnx_path, ort_opt_level)
    notes: list[str] = []
    meta = graph_metadata(session)
    if inputs_file:
        feeds = load_inputs(inputs_file, session)
    else:
        default = declared_input_shape(model)
        input_shapes = input_shapes or _exported_shapes(meta, len(session.get_inputs()))
        grow = _accepted_growth(session, model, input_shapes, default, value_ranges, notes)
        feeds = sample_inputs(session, input_shapes, samples, seed, default, value_ranges, grow)
    refs = _References(model, model64, conv_outputs=conv_outputs(onnx_path))
    graph_dtype = _graph_float_dtype(session, meta)
    if graph_dtype is not None and torch.finfo(graph_dtype).eps > torch.finfo(model_dtype(model)).eps:
        # A graph of lower precision than the checkpoint (export --dtype float16) is held to what the
        # checkpoint's own math gives at that precision, not to what it gives at its own.
        refs.at_graph_dtype, refs.graph_dtype = set_eval(structural_copy(model, graph_dtype)), graph_dtype
    unit = torch.finfo(refs.graph_dtype or model_dtype(model)).eps / 2
    if atol is not None or rtol is not None:
        atol, rtol = atol or 0.0, rtol or 0.0
        rule, criterion = _allclose_rule(atol, rtol), f"allclose(atol={atol:g}, rtol={rtol:g}) against the checkpoint"
    else:
        rule = _default_rule
        criterion = (
            f"|onnx - float64| <= {SAFETY:g} x |original - float64| + {FLOOR_ULPS:g} ulp x output scale "
            f"(ORT optimizations: {ort_opt_level})"
        )
    onnx_names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]
    if progress:
        progress(f"run {len(feeds)} input batch(es)")
    # The graph runs first, on its own: its session (weights, packed weights) is gone before the checkpoint's
    # model runs, and the model's file-backed weights are not resident while the graph runs (handed back again:
    # finding a second input size may have run the model).
    release_file_pages(original)
    graph_outputs = _run_graph(session, feeds)
    del session
    trim_heap()
    checks = _run_checks(graph_outputs, refs, feeds, input_names, rule, unit, onnx_names)
    result = VerificationResult(criterion, samples if not inputs_file else 1, checks, ort_opt_level=ort_opt_level)
    result.batch_input_shapes = [[list(v.shape) for v in feed.values()] for feed in feeds]
    result.input_shapes = result.batch_input_shapes[0]
    result.reference, more, result.reference_sha256 = _reference(prepared, meta, model)
    result.notes = notes + more
    if refs.graph_dtype is not None:
        result.reference += f"; the graph computes in {str(refs.graph_dtype).removeprefix('torch.')}, so the "
        result.reference += "checkpoint's own error is measured at that precision"
    if not all(c.passed for c in checks) and ort_opt_level != "disable":
        if progress:
            progress("re-run with onnxruntime optimizations disabled")
        del graph_outputs
        release_file_pages(original)
        plain = _run_graph(ort_session(onnx_path, "disable"), feeds)
        trim_heap()
        cause_is_optimizer = all(c.passed for c in _run_checks(plain, refs, feeds, input_names, rule, unit, onnx_names))
        del plain
    sample = _as_args([feeds[0][name] for name in input_names], model_dtype(original))
    # The per-layer check needs neither the graph's outputs nor the reference models: hand their memory back.
    graph_outputs = None
    del refs, model64
    trim_heap()
    if per_layer:
        if progress:
            progress("compare initializers per layer")
        report = compare_layers(original, detection, onnx_path, prepared=prepared, sample=sample)
        result.layers, result.layers_unpaired, result.layers_compared = report.checks, report.unpaired, report.compared
        if report.none_paired and not all(c.passed for c in checks):
            result.foreign = True
        elif report.none_paired:
            result.notes.append(
                f"none of the model's {report.compared} conv/linear layers has its weights in the graph as a "
                "constant: nothing was compared per layer"
            )
    if result.foreign:
        result.cause = (
            f"--onnx is not a graph of this SOURCE's model: its outputs differ and none of the model's "
            f"{result.layers_compared} conv/linear layers has its weights in it"
        )
        result.hint = "pass the graph that `wsfold export` wrote from this SOURCE (and the same --arch)"
        if any("not from this SOURCE" in note for note in result.notes):
            result.hint += "; its metadata names another file: see the warning"
    elif not all(c.passed for c in checks) and ort_opt_level != "disable":
        if cause_is_optimizer:
            result.cause = "onnxruntime's graph optimizer (the graph passes with optimizations disabled)"
            result.hint = (
                "deploy with SessionOptions.graph_optimization_level = ORT_ENABLE_BASIC (or disabled), or re-export "
                "with `wsfold export`, which writes Pad(0)+MaxPool so that onnxruntime does not miscompile it"
            )
        else:
            result.cause = "the exported graph (it fails with onnxruntime's optimizations disabled too)"
            result.hint = _hint(result, per_layer)
    elif not result.passed:
        result.cause = "the exported graph"
        result.hint = _hint(result, per_layer)
    return result


def _hint(result: VerificationResult, per_layer: bool) -> str:
    other_source = any("not from this SOURCE" in note for note in result.notes)
    if any(not o.passed and not o.compared for o in result.outputs):  # shapes or output counts differ
        return (
            "the graph's outputs are not shaped as this model's: check that --onnx was exported from this SOURCE "
            "and architecture" + (" (its metadata names another file: see the warning)" if other_source else "")
        )
    if not per_layer:
        return "run with --per-layer to find the layer whose weights differ"
    if not result.layers:
        return "no layer's weights could be paired with the graph's: check that --onnx was exported from this SOURCE"
    if any(not layer.passed for layer in result.layers):
        return "see the failing layers"
    return "every weight matches its layer: the difference is in what the graph does with them (its operations)"


def graph_metadata(session) -> dict[str, str]:
    """The graph's metadata_props (what wsfold export stamped), from the session that loaded it (loading the
    file again would read a one-file graph's weights once more)."""
    return dict(session.get_modelmeta().custom_metadata_map)


# Ops that keep an output's layout: through them, an output is still the convolution's (N, C, ...).
_LAYOUT_KEEPING = {
    "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Gelu", "Softplus", "Mish", "Clip", "Identity", "Cast", "Erf", "Neg", "Abs", "Exp", "Sqrt",
}  # fmt: skip


def conv_outputs(onnx_path: Path) -> set[str]:
    """The graph outputs that a Conv/ConvTranspose computes (through elementwise ops): their dim 1 holds channels.
    A (N, H, W) depth map or (N, tokens, dim) output does not, though it has the rank of a 1-D conv's output."""
    from .onnx_store import load_without_weights

    graph = load_without_weights(onnx_path).graph
    producers = {out: node for node in graph.node for out in node.output}
    found = set()
    for output in graph.output:
        name, seen = output.name, 0
        while name in producers and seen < 64:
            node, seen = producers[name], seen + 1
            if node.op_type in ("Conv", "ConvTranspose"):
                found.add(output.name)
                break
            if node.op_type not in _LAYOUT_KEEPING:
                break
            # Follow the operand that is computed (not a constant): the first input with a producer.
            name = next((i for i in node.input if i in producers and producers[i].op_type != "Constant"), "")
    return found


def _exported_shapes(meta: dict[str, str], count: int) -> list[tuple[int, ...]] | None:
    """The input shapes the graph was exported with (``wsfold_input_shapes``), when it records one per input."""
    try:
        shapes = json.loads(meta.get("wsfold_input_shapes", "null"))
    except (json.JSONDecodeError, RecursionError):
        return None
    if (
        isinstance(shapes, list)
        and len(shapes) == count
        and all(isinstance(s, list) and all(isinstance(d, int) and 0 < d < 2**31 for d in s) for s in shapes)
    ):
        return [tuple(s) for s in shapes]
    return None


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


def _accepted_growth(session, model, shapes, default, value_ranges, notes: list[str]) -> int:
    """For a graph with dynamic spatial dims: how many more rows and columns a second sample size has, one the
    original model accepts (a U-Net takes only multiples of its downsampling); 0, with a note, when none is."""
    if not any(not (isinstance(d, int) and d > 0) for spec in session.get_inputs() for d in list(spec.shape)[2:]):
        return 0
    base = sample_inputs(session, shapes, 1, 0, default, value_ranges, grow=0)[0]
    sizes = [list(a.shape) for a in base.values()]
    largest = max((max(s[2:], default=0) for s in sizes), default=0)
    for grow in dict.fromkeys([1, 2, 4, 8, 16, 32, largest]):
        if grow <= 0:
            continue
        feed = sample_inputs(session, shapes, 1, 0, default, value_ranges, grow=grow)[-1]
        try:
            with torch.no_grad():
                model(*_as_args([feed[i.name] for i in session.get_inputs()], model_dtype(model)))
        except Exception:  # noqa: BLE001 - the model refuses that size: try the next
            continue
        return grow
    notes.append(f"the model accepts no other spatial size near {sizes}: dynamic sizes checked at that one only")
    return 0


def _reference(prepared: Prepared | None, meta: dict[str, str], model: nn.Module) -> tuple[str, list[str], str | None]:
    """What the graph is compared against, in words, a note when the graph says it came from another file, and
    the sha256 of SOURCE's file (None for a model handed in or a directory)."""
    from .load import file_sha256

    dtype = str(model_dtype(model)).removeprefix("torch.")
    source = prepared.source if prepared is not None else None
    if source is None:
        return f"the model handed to verify_onnx, in PyTorch at {dtype} and in float64", [], None
    if source.is_dir():
        return f"the model directory {source}, in PyTorch at {dtype} and in float64", [], None
    digest = file_sha256(source)
    loaded = prepared.loaded
    if loaded is not None and loaded.manifest is not None:
        what = (
            f"the already baked model stored in {source} (sha256 {digest[:16]}; wsfold manifest: "
            f"{len(loaded.manifest['layers'])} layer(s) baked, every baked tensor matching its recorded digest), "
            f"not the original weights"
        )
    else:
        what = f"the model in {source} (sha256 {digest[:16]})"
    notes = []
    if meta.get("wsfold_source_sha256") not in (None, digest):
        notes.append(
            f"the graph was exported from {meta.get('wsfold_source', 'another file')} with sha256 "
            f"{meta['wsfold_source_sha256'][:16]}, not from this SOURCE"
        )
    return f"{what}, in PyTorch at {dtype} and in float64", notes, digest
