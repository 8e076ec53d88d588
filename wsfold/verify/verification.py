"""Prove with onnxruntime that an ONNX graph computes what the original checkpoint computes.

Pass rule (default): for every output and sample, let R be the original model at its own dtype, R64 the same
model evaluated in float64, O the ONNX output. The graph passes when |O - R64|max <= 4 * |R - R64|max +
8 * u * |R64|max, u the unit roundoff of the dtype: the deployed graph may not be markedly less accurate than
the original model is in its own precision. --atol/--rtol replace it with allclose(O, R, atol, rtol).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..bake.modeltree import (
    model_dtype,
    require_module,
    set_eval,
    structural_copy,
)
from ..errors import VerifyInputError, first_line
from ..inputs import ValueRange
from ..io.memory import release_file_pages, released_after_call, trim_heap
from .layers import LayerCheck, compare_layers

if TYPE_CHECKING:
    from ..bake.findings import Detection
    from ..pipeline import Prepared
from .criterion import FLOOR_ULPS, SAFETY, OutputCheck, _allclose_rule, _compare, _default_rule, conv_outputs
from .feeds import (
    MAX_SAMPLES,
    _accepted_growth,
    _as_args,
    _exported_shapes,
    check_inputs_file,
    load_inputs,
    sample_inputs,
)
from .reference import _evaluate, _References, _same_values, float64_reference
from .runtimes import RuntimeRun, check_runtimes, precision_name, run_runtime
from .runtimes.ort import ORT_LEVELS, _graph_float_dtype, _run_graph, check_precision, graph_metadata, ort_session
from .runtimes.ort import run as ort_run


@dataclass
class RuntimeCheck:
    """One runtime's run of the graph, judged output by output; ``precision`` is what it really computed in."""

    runtime: str
    version: str
    precision: str
    outputs: list[OutputCheck]
    note: str | None = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "version": self.version,
            "precision": self.precision,
            "passed": self.passed,
            "note": self.note,
            "outputs": [o.to_dict() for o in self.outputs],
        }


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
    runtimes: list[RuntimeCheck] = field(default_factory=list)  # every runtime's checks; ``outputs`` the first's

    @property
    def warnings(self) -> list[str]:
        return self.notes + [f"{o.name}: {w}" for o in self.outputs for w in o.warnings]

    @property
    def passed(self) -> bool:
        outputs = all(o.passed for o in self.outputs) and all(r.passed for r in self.runtimes)
        return outputs and not self.foreign and all(layer.passed for layer in self.layers)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [f"{'PASSED' if self.passed else 'FAILED'} ({self.criterion}; {self.samples} sample(s))"]
        runs = self.runtimes or [RuntimeCheck("onnxruntime", "", "", self.outputs)]
        for run in runs:
            where = f" [{run.runtime}, {run.precision}]" if len(runs) > 1 or run.precision not in ("", "f32") else ""
            for o in run.outputs:
                lines.append(
                    f"  {o.name}{where}: max abs {o.max_abs_error:.3g}, onnx-vs-float64 {o.onnx_vs_float64:.3g} "
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
            "runtimes": [r.to_dict() for r in self.runtimes],
        }


def check_onnx_file(path: str | Path) -> Path:
    """``path`` as a Path, once it is known to hold an ONNX graph: a missing file, something else than a file, or
    a file that does not parse as an ONNX model with a graph is a VerifyInputError, said before any other work.
    Only the graph's structure is read (see onnx_store.load_without_weights)."""
    from google.protobuf.message import DecodeError

    from ..onnx.store import load_without_weights

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


def _run_checks(
    runs: list[RuntimeRun], refs: _References, feeds, input_names, rule, onnx_names
) -> list[list[OutputCheck]]:
    """Every runtime's outputs (computed before, without the checkpoint's model running) against the checkpoint's,
    feed by feed; the references are evaluated once per feed for all runtimes. Each module's memory-mapped
    weights are handed back once it has run: not all resident at once."""
    with released_after_call(refs.model, refs.model64):
        return _checks(runs, refs, feeds, input_names, rule, onnx_names)


def _checks(runs: list[RuntimeRun], refs: _References, feeds, input_names, rule, onnx_names) -> list[list[OutputCheck]]:
    base = model_dtype(refs.model)
    per_run: list[list[OutputCheck]] = [[] for _ in runs]
    for f, feed in enumerate(feeds):
        arrays = [feed[name] for name in input_names]
        ref_names, ref = _evaluate(refs.model, _as_args(arrays, base))
        if f == 0:
            _, again = _evaluate(refs.model, _as_args(arrays, base))
            if any(not _same_values(a, b) for a, b in zip(ref, again)):
                raise VerifyInputError(
                    "the checkpoint's model gives different outputs for the same input in eval mode (dropout "
                    "forced on? random noise in forward?): no graph can be compared with it.",
                    "make the model deterministic in eval mode.",
                )
        _, ref64 = refs.evaluate64(_as_args(arrays, torch.float64))
        # A runtime of lower precision than the checkpoint is held to the checkpoint's math at that precision.
        lowered: dict[torch.dtype, list[torch.Tensor]] = {}
        for run in runs:
            if _coarser(run.precision, base) and run.precision not in lowered:
                lowered[run.precision] = refs.evaluate_at(run.precision, arrays)
        for run, checks in zip(runs, per_run):
            outs = run.outputs[f]
            if not checks:
                checks.extend(
                    OutputCheck(
                        i,
                        onnx_names[i] if i < len(onnx_names) else "(missing)",
                        ref_names[i] if i < len(ref_names) else "(missing)",
                        [],
                        has_channels=i < len(outs) and (outs[i].ndim >= 4 or onnx_names[i] in refs.conv_outputs),
                    )
                    for i in range(max(len(outs), len(ref)))
                )
            low = lowered.get(run.precision)
            unit = torch.finfo(run.precision if low is not None else base).eps / 2
            for i, check in enumerate(checks):
                if i >= len(outs) or i >= len(ref):
                    check.passed = False
                    if not check.problems:
                        check.problems.append(
                            f"the ONNX graph has {len(outs)} output(s), the checkpoint's model {len(ref)}"
                        )
                    continue
                check.shape = check.shape or list(outs[i].shape)
                _compare(outs[i], ref[i], ref64[i], check, rule, unit, None if low is None else low[i])
    return per_run


def _coarser(a: torch.dtype, b: torch.dtype) -> bool:
    return torch.finfo(a).eps > torch.finfo(b).eps


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
    runtimes: Sequence[str] | None = None,
    precision: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerificationResult:
    """Compare ``onnx_path`` with the original ``model`` (unbaked, as loaded from SOURCE), or with the original of
    a :func:`wsfold.prepare` result (whose detection and baked model are then reused). ``model`` is not changed.
    ``value_ranges``: per input, where random samples are drawn (see wsfold.inputs). ``runtimes``: which run the
    graph ("onnxruntime", "openvino"; default onnxruntime), each judged by the same rule on the same inputs, at
    the precision it really computes in (``precision`` asks for one: "f32", "bf16", "f16")."""
    from ..bake.detect import detect_layers
    from ..bake.findings import Detection
    from ..onnx.trace import declared_input_shape
    from ..pipeline import Prepared

    prepared = model if isinstance(model, Prepared) else None
    if prepared is not None:
        if prepared.original is None:
            raise ValueError("verify_onnx needs the original model: call prepare(..., keep_original=True)")
        model, detection = prepared.original, prepared.detection
    require_module(model, "verify_onnx")
    if detection is not None and not isinstance(detection, Detection):
        raise TypeError(f"verify_onnx's detection must be a Detection, not {type(detection).__name__}")
    runtimes = check_runtimes(list(runtimes or []), precision)
    inputs_file = Path(inputs_file) if inputs_file is not None else None
    onnx_path = check_onnx_file(onnx_path)
    from ..quantize.verdict import is_qdq

    if is_qdq(onnx_path):
        raise VerifyInputError(
            f"{onnx_path} is an int8 QDQ graph: the float rule would always fail it.",
            "judge it with wsfold.verify_int8(prepared, path, holdout) (the CLI's verify does so itself).",
        )
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
    # What the caller let go of (the CLI's baked model: a module tree holds reference cycles, which only the
    # collector frees) leaves the heap before the sessions load.
    gc.collect()
    trim_heap()
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
    computes_in = refs.graph_dtype or graph_dtype or model_dtype(model)
    if "onnxruntime" in runtimes:
        check_precision(precision, computes_in)
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
    sample = _as_args([feeds[0][name] for name in input_names], model_dtype(original))
    report = None
    if per_layer:
        # First, while no runtime holds the graph: the check bakes the model again (the CLI let prepare's go),
        # and a session's memory is not all handed back when it closes. ResNetV2-50x2: peak 3.2x -> 2.5x.
        del session
        gc.collect()
        trim_heap()
        if progress:
            progress("compare initializers per layer")
        report = compare_layers(original, detection, onnx_path, prepared=prepared, sample=sample)
        gc.collect()
        trim_heap()
        session = None
    if progress:
        progress(f"run {len(feeds)} input batch(es) on {', '.join(runtimes)}")
    # The graph runs first, on its own: each runtime's session (weights, packed weights) is gone before the next
    # one loads and before the checkpoint's model runs, and the model's file-backed weights are not resident
    # while the graph runs (handed back again: finding a second input size may have run the model).
    release_file_pages(original)
    done: dict[str, RuntimeRun] = {}
    if "onnxruntime" in runtimes and session is None:  # first, whatever the order asked
        done["onnxruntime"] = ort_run(
            onnx_path, feeds, precision=precision, graph_dtype=computes_in, level=ort_opt_level
        )
    elif "onnxruntime" in runtimes:  # on the session already open
        import onnxruntime

        done["onnxruntime"] = RuntimeRun(
            "onnxruntime", onnxruntime.__version__, computes_in, _run_graph(session, feeds)
        )
    del session
    trim_heap()
    for name in runtimes:
        if name not in done:
            done[name] = run_runtime(name, onnx_path, feeds, precision=precision, graph_dtype=computes_in)
    runs = [done[name] for name in runtimes]
    per_run = _run_checks(runs, refs, feeds, input_names, rule, onnx_names)
    checks = per_run[0]
    result = VerificationResult(criterion, samples if not inputs_file else 1, checks, ort_opt_level=ort_opt_level)
    result.runtimes = [
        RuntimeCheck(run.runtime, run.version, precision_name(run.precision), found, run.note)
        for run, found in zip(runs, per_run)
    ]
    result.batch_input_shapes = [[list(v.shape) for v in feed.values()] for feed in feeds]
    result.input_shapes = result.batch_input_shapes[0]
    result.reference, more, result.reference_sha256 = _reference(prepared, meta, model)
    result.notes = notes + more + [run.note for run in runs if run.note]
    if refs.graph_dtype is not None:
        result.reference += f"; the graph computes in {str(refs.graph_dtype).removeprefix('torch.')}, so the "
        result.reference += "checkpoint's own error is measured at that precision"
    lowered = [r for r in runs if torch.finfo(r.precision).eps > torch.finfo(refs.graph_dtype or computes_in).eps]
    for run in lowered:
        result.reference += (
            f"; {run.runtime} computes in {precision_name(run.precision)}, so for it the checkpoint's own error is "
            f"measured at {precision_name(run.precision)} (CPU autocast)"
        )
    ort_check = next((r for r in result.runtimes if r.runtime == "onnxruntime"), None)
    ort_failed = ort_check is not None and not ort_check.passed
    del runs
    if ort_failed and ort_opt_level != "disable":
        if progress:
            progress("re-run with onnxruntime optimizations disabled")
        release_file_pages(original)
        plain = ort_run(onnx_path, feeds, precision=None, graph_dtype=computes_in, level="disable")
        cause_is_optimizer = all(c.passed for c in _run_checks([plain], refs, feeds, input_names, rule, onnx_names)[0])
        del plain
    del refs, model64
    trim_heap()
    if report is not None:
        result.layers, result.layers_unpaired, result.layers_compared = report.checks, report.unpaired, report.compared
        if report.none_paired and not all(c.passed for c in checks):
            result.foreign, result.layers = True, []  # one verdict, not a list of unrelated pairs
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
    elif ort_failed and ort_opt_level != "disable":
        if cause_is_optimizer:
            result.cause = "onnxruntime's graph optimizer (the graph passes with optimizations disabled)"
            result.hint = (
                "deploy with SessionOptions.graph_optimization_level = ORT_ENABLE_BASIC (or disabled), or re-export "
                "with `wsfold export`, which writes Pad(0)+MaxPool so that onnxruntime does not miscompile it"
            )
        else:
            result.cause = "the exported graph (it fails with onnxruntime's optimizations disabled too)"
            result.hint = _hint(result, per_layer)
    elif not result.passed and not ort_failed and any(not r.passed for r in result.runtimes):
        result.cause, result.hint = _runtime_cause(result, ort_check is not None)
    elif not result.passed:
        result.cause = "the exported graph"
        result.hint = _hint(result, per_layer)
    return result


def _runtime_cause(result: VerificationResult, ort_ran: bool) -> tuple[str, str]:
    """Why a runtime other than onnxruntime failed, where onnxruntime passed (or did not run)."""
    bad = next(r for r in result.runtimes if not r.passed)
    if bad.precision not in ("f32", "f64") and bad.note:
        return (
            f"{bad.runtime} computing in {bad.precision} (its default here): its outputs are further from the "
            f"checkpoint's than the checkpoint's own math at {bad.precision} is"
            + (" (onnxruntime, in f32, passes)" if ort_ran else ""),
            f"force f32 with --precision f32 to check the graph itself; whether {bad.precision} is accurate enough "
            "is the deployment's call",
        )
    if ort_ran:
        return (
            f"{bad.runtime} at {bad.precision}: it computes this graph differently from onnxruntime, which passes",
            f"report it to {bad.runtime}'s maintainers with this graph, or deploy with onnxruntime",
        )
    return "the exported graph", _hint(result, True)


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
    if result.layers_unpaired:
        return (
            f"{len(result.layers_unpaired)} layer(s) of the model were not found in the graph "
            f"({', '.join(result.layers_unpaired[:3])}): their weights may have changed beyond recognition"
        )
    return "every weight matches its layer: the difference is in what the graph does with them (its operations)"


def _reference(prepared: Prepared | None, meta: dict[str, str], model: nn.Module) -> tuple[str, list[str], str | None]:
    """What the graph is compared against, in words, a note when the graph says it came from another file, and
    the sha256 of SOURCE's file (None for a model handed in or a directory)."""
    from ..load.read import file_sha256

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
