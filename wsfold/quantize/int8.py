"""Quantize a baked graph to static int8 with onnxruntime.quantization (QDQ, per-channel symmetric int8 weights,
int8 activations), check its structure, and judge it on held-out data against the checkpoint's float output."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CalibrationError, OptionError, QuantizeError, WsfoldError, first_line
from .data import InputSpec, Samples, open_samples, sample_shapes
from .images import Preprocess, declared_preprocess

if TYPE_CHECKING:
    from ..pipeline import Prepared

METHODS = ("minmax", "percentile", "entropy")
# onnxruntime 1.32's quantize_static runs entropy calibration with 128 histogram bins and 128 quantized bins and
# cannot be told otherwise: its KL search then has one candidate, the full range (minmax's scales, measured
# byte-identical). wsfold runs onnxruntime's entropy calibrator itself with 2048 bins (TensorRT's choice) and hands
# the ranges to quantize_static as TensorQuantOverrides.
ENTROPY_BINS = 2048
# Defaults from measurements (docs/int8.md): the trained digits fixture quantizes at 33.7 dB with 100% top-1
# agreement on its 597 held-out images; calibrated on all-zero data instead, at 1.3 dB and 40% agreement.
MIN_SQNR_DB = 20.0
MIN_AGREEMENT = 0.97
HOLDOUT_SHARE = 0.2  # of CAL, when no --holdout is given
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# What is quantized: the layers, and the ops between them that have int8 kernels and keep a layer's output int8.
# Reshape/Transpose/Squeeze are left out: onnxruntime 1.32's quantizer shares their quantization with a tensor it
# has itself turned into an initializer around a GroupNorm (Reshape-InstanceNormalization-Reshape), then refuses
# the graph ("shared mode is not supported for weight"); a reshape computes nothing int8 would speed up.
QUANTIZED_OPS = (*COMPUTE_OPS, "Add", "Mul", "Relu", "Clip", "Sigmoid", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Concat", "Resize", "LeakyRelu", "HardSigmoid", "HardSwish")  # fmt: skip
# Ops that move or reshape values, or are the Q/DQ pairs themselves: not computations that int8 could speed up.
_SHAPE_OPS = {
    "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Gather", "Concat", "Slice", "Constant",
    "Identity", "Cast", "QuantizeLinear", "DequantizeLinear", "Expand", "Range", "Size",
}  # fmt: skip


@dataclass
class OutputVerdict:
    name: str
    sqnr_db: float
    top1_agreement: float | None  # for [N, C] outputs
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Int8Verdict:
    """``bool(verdict)`` is whether the int8 graph passed; ``str`` gives the figures and thresholds."""

    outputs: list[OutputVerdict]
    weights: dict[str, int]  # {"int8": n, "float": n} conv/linear weights
    float_ops: list[dict[str, str]]  # {"op", "node", "reason"}
    failures: list[str]  # structural: a weight not int8, a quantizer warning, naming the layer
    holdout: dict[str, Any]
    min_sqnr: float
    min_agreement: float
    worst_layers: list[dict[str, Any]] = field(default_factory=list)  # on failure: the layers that lose most

    @property
    def passed(self) -> bool:
        return not self.failures and all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [f"{'PASSED' if self.passed else 'FAILED'} (SQNR >= {self.min_sqnr:g} dB, top-1 agreement >= "
                 f"{self.min_agreement:.0%} on {self.holdout['samples']} held-out sample(s))"]  # fmt: skip
        for o in self.outputs:
            agree = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.2%}"
            lines.append(f"  {o.name}: SQNR {o.sqnr_db:.1f} dB{agree}: {'ok' if o.passed else 'FAIL'}")
        lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "weights": self.weights,
            "float_ops": self.float_ops,
            "failures": self.failures,
            "outputs": [o.to_dict() for o in self.outputs],
            "holdout": self.holdout,
            "thresholds": {"min_sqnr_db": self.min_sqnr, "min_agreement": self.min_agreement},
            "worst_layers": self.worst_layers,
        }


@dataclass
class QuantizeResult:
    verdict: Int8Verdict
    output: Path
    placed: bool
    calibration: dict[str, Any]
    size_bytes: dict[str, int]
    excluded: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.verdict.to_dict(),
            "output": str(self.output),
            "placed": self.placed,
            "calibration": self.calibration,
            "size_bytes": self.size_bytes,
            "excluded": self.excluded,
            "notes": self.notes,
        }


def input_specs(session) -> list[InputSpec]:
    from ..verify.feeds import _NP_DTYPES

    return [
        InputSpec(
            i.name,
            np.dtype(_NP_DTYPES.get(i.type, np.float32)),
            [d if isinstance(d, int) and d > 0 else None for d in i.shape],
        )  # fmt: skip
        for i in session.get_inputs()
    ]


def _check_thresholds(min_sqnr: float, min_agreement: float, method: str) -> None:
    if method not in METHODS:
        raise OptionError(f"--calibrate-method {method!r} is not one of {', '.join(METHODS)}.", "use minmax.")
    if not math.isfinite(min_sqnr):
        raise OptionError(f"--min-sqnr {min_sqnr} must be a finite number of dB.", f"use --min-sqnr {MIN_SQNR_DB:g}.")
    if not (0.0 <= min_agreement <= 1.0):
        raise OptionError(
            f"--min-agreement {min_agreement} must be a share from 0 to 1.", f"use --min-agreement {MIN_AGREEMENT}."
        )


class _Reader:
    """onnxruntime's CalibrationDataReader over a range of samples, a batch at a time."""

    def __init__(self, samples: Samples, start: int, stop: int, batch: int) -> None:
        self.samples, self.start, self.stop, self.batch = samples, start, stop, batch
        self.rewind()

    def rewind(self) -> None:
        self.it: Iterator[dict[str, np.ndarray]] = self.samples.batches(self.start, self.stop, self.batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # what the QDQ debugging tools read
        self.rewind()
        return self.it


class _Caught(logging.Handler):
    """The quantizer's own warnings (a weight left unquantized, a bias whose int32 scale would overflow)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def quantize_graph(
    float_path: Path,
    q_path: Path,
    work: Path,
    reader: _Reader,
    *,
    method: str,
    exclude_nodes: Sequence[str],
) -> list[str]:
    """onnxruntime's recommended pre-processing, then quantize_static to QDQ; returns the quantizer's warnings."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    try:
        quant_pre_process(str(float_path), str(pre))
    except Exception:  # noqa: BLE001 - symbolic shape inference refuses some graphs: the rest still applies
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    exclude_nodes = [*exclude_nodes, *_float_pads(pre)]
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.MinMax}[method]  # fmt: skip
    # MinMax's calibration graph outputs each tensor's min and max only (a few numbers per batch), so its memory
    # does not grow with CAL's activations; CalibMaxIntermediateOutputs is not used: in onnxruntime 1.32 it drops
    # the batches it clears without merging their ranges ("No data is collected").
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if method == "entropy":
        extra["TensorQuantOverrides"] = _entropy_ranges(pre, work, reader)
        reader.rewind()
    caught = _Caught()
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    for lg in loggers:
        lg.addHandler(caught)
    # The quantizer's scratch files (its augmented calibration graph) go in wsfold's temporary folder beside OUT,
    # which is removed however the command ends, rather than in the system's temporary folder.
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(work)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print progress to stdout
            quantize_static(
                str(pre),
                str(q_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QInt8,
                calibrate_method=calibrate,
                nodes_to_exclude=list(exclude_nodes),
                op_types_to_quantize=list(QUANTIZED_OPS),
                extra_options=extra,
            )
    except WsfoldError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer's refusals are about this graph
        raise QuantizeError(
            f"onnxruntime's quantizer cannot quantize the graph ({type(exc).__name__}: {first_line(exc)}).",
            "check the calibration data; --exclude the layer it names to keep it in float.",
        ) from None
    finally:
        tempfile.tempdir = saved_tempdir
        for lg in loggers:
            lg.removeHandler(caught)
    return caught.messages


def _entropy_ranges(model: Path, work: Path, reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    """Each activation's range from onnxruntime's entropy (KL) calibrator at ENTROPY_BINS histogram bins, as the
    per-tensor overrides quantize_static takes (its own entropy run cannot be given the bins)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        str(model),
        None,
        augmented_model_path=str(work / "entropy_augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
    )
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    overrides = {}
    for name, data in ranges.data.items():
        low, high = data.range_value
        overrides[name] = [
            {"rmin": np.asarray(low, np.float32).reshape(()), "rmax": np.asarray(high, np.float32).reshape(())}
        ]
    del calibrator
    return overrides


def _float_pads(path: Path) -> list[str]:
    """Pad nodes whose pad value is a float initializer (wsfold writes Pad(-0.0) before a MaxPool so that
    onnxruntime keeps -inf out of it): the QDQ quantizer would share the data's quantization with that
    initializer and refuses ("shared mode is not supported for weight"). They stay in float; a pad moves values."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Pad" and len(n.input) > 2 and n.input[2] in inits]


def structure(q_path: Path, names: dict[str, str], excluded: set[str]) -> tuple[dict[str, int], list[dict], list[str]]:
    """(int8/float weight counts, ops left in float with the reason, structural failures naming the layer)."""
    import onnx

    model = onnx.load(str(q_path), load_external_data=False)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    constants = {t.name for t in graph.initializer}
    counts = {"int8": 0, "float": 0}
    float_ops: list[dict[str, str]] = []
    failures: list[str] = []
    for node in graph.node:
        if node.op_type in COMPUTE_OPS and len(node.input) > 1:
            source = producers.get(node.input[1])
            if source is None and node.input[1] not in {t.name for t in graph.initializer}:
                continue  # an activation x activation product (attention): no weight to quantize
            if source is not None and source.op_type == "DequantizeLinear" and source.input[0] in int8:
                counts["int8"] += 1
                continue
            if source is not None and source.op_type not in ("DequantizeLinear", "Transpose", "Identity", "Cast"):
                continue  # computed operand, not a weight
            counts["float"] += 1
            layer = names.get(node.name, node.name)
            if node.name in excluded:
                float_ops.append({"op": node.op_type, "node": layer, "reason": "kept in float by --exclude"})
            else:
                failures.append(f"layer {layer} ({node.op_type}): its weight is not int8 in the quantized graph")
        elif node.op_type == "Pad" and len(node.input) > 2 and node.input[2] in constants:
            float_ops.append({"op": "Pad", "node": node.name, "reason": "kept in float: its pad value (-0.0, so that "
                              "onnxruntime keeps -inf out of the MaxPool after it) is a constant the quantizer "
                              "cannot share; a pad moves values"})  # fmt: skip
        elif node.op_type not in _SHAPE_OPS and node.op_type not in QUANTIZED_OPS:
            float_ops.append({
                "op": node.op_type,
                "node": node.name,
                "reason": "no int8 kernel for it in onnxruntime's QDQ quantizer: it runs in float",
            })  # fmt: skip
    return counts, float_ops, failures


def judge(
    model: torch.nn.Module,
    q_path: Path,
    samples: Samples,
    start: int,
    stop: int,
    *,
    min_sqnr: float,
    min_agreement: float,
    batch: int = 4,
) -> list[OutputVerdict]:
    """Per output, over the holdout: SQNR of the int8 graph against the checkpoint's float output (the baked
    model in PyTorch), and for [N, C] outputs the share of samples whose top-1 class agrees. Streamed."""
    import onnxruntime as ort

    from ..onnx.trace import flatten_outputs
    from ..verify.runtimes.ort import ort_session

    session = ort_session(q_path)
    names = [o.name for o in session.get_outputs()]
    signal = [0.0] * len(names)
    noise = [0.0] * len(names)
    agree: list[int | None] = [0] * len(names)
    count = 0
    first: dict[str, np.ndarray] | None = None
    identical = True
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    del ort
    for feed in samples.batches(start, stop, batch):
        if first is None:
            first = {k: v[:1] for k, v in feed.items()}
        identical = identical and all(np.array_equal(v, np.broadcast_to(first[k], v.shape)) for k, v in feed.items())
        got = session.run(None, feed)
        args = tuple(
            torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(dtype) if feed[s.name].dtype.kind == "f"
            else torch.from_numpy(feed[s.name]) for s in samples.specs
        )  # fmt: skip
        try:
            with torch.no_grad():
                _, want = flatten_outputs(model(*args))
        except Exception as exc:  # noqa: BLE001 - the user's model, on the user's data
            shapes = ", ".join(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args)
            raise CalibrationError(
                f"the checkpoint's model cannot run on the held-out samples ({shapes}: {type(exc).__name__}: "
                f"{first_line(exc)}).",
                "check that the graph and the samples are this SOURCE's (--onnx, --inputs or --holdout).",
            ) from None
        for i, (g, w) in enumerate(zip(got, want)):
            w = w.double().numpy()
            g = g.astype(np.float64)
            signal[i] += float((w**2).sum())
            noise[i] += float(((w - g) ** 2).sum())
            if agree[i] is not None and w.ndim == 2 and w.shape[1] > 1:
                agree[i] += int((w.argmax(1) == g.argmax(1)).sum())
            else:
                agree[i] = None
        count += len(next(iter(feed.values())))
    del session
    verdicts = []
    if identical and count > 1:
        # Constant held-out data (all-zero images) agrees with anything: a verdict on it proves nothing.
        return [OutputVerdict(name, float("nan"), None, False) for name in names]
    for i, name in enumerate(names):
        sqnr = 10 * math.log10(max(signal[i], 1e-300) / max(noise[i], 1e-300))
        top1 = None if agree[i] is None else agree[i] / count
        passed = sqnr >= min_sqnr and (top1 is None or top1 >= min_agreement)
        verdicts.append(OutputVerdict(name, round(sqnr, 2), top1, passed))
    return verdicts


def worst_layers(
    float_path: Path,
    q_path: Path,
    reader: _Reader,
    names: dict[str, str],
    work: Path,
    excluded: set[str] = frozenset(),
    top: int = 5,
):
    """The layers whose outputs lose most (SQNR of each layer's output in the int8 graph against the float
    graph's), from onnxruntime's QDQ debugging tools."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    aug_float, aug_q = work / "aug_float.onnx", work / "aug_q.onnx"
    modify_model_output_intermediate_tensors(str(float_path), str(aug_float))
    modify_model_output_intermediate_tensors(str(q_path), str(aug_q))
    reader.rewind()
    float_acts = collect_activations(str(aug_float), reader)
    reader.rewind()
    q_acts = collect_activations(str(aug_q), reader)
    errors = compute_activation_error(create_activation_matching(q_acts, float_acts))
    import onnx

    producers = {
        out: n.name for n in onnx.load(str(float_path), load_external_data=False).graph.node for out in n.output
    }
    ranked = sorted(
        ((e["xmodel_err"], name) for name, e in errors.items() if "xmodel_err" in e and producers.get(name) in names),
        key=lambda x: x[0],
    )
    ranked = [(err, name) for err, name in ranked if producers[name] not in excluded]
    return [{"layer": names[producers[name]], "sqnr_db": round(float(err), 2)} for err, name in ranked[:top]]


def quantize_onnx(
    prepared: Prepared,
    out: str | Path,
    calibration: str | Path,
    *,
    holdout: str | Path | None = None,
    method: str = "minmax",
    min_sqnr: float = MIN_SQNR_DB,
    min_agreement: float = MIN_AGREEMENT,
    exclude: Sequence[str] = (),
    keep_failing: bool = False,
    force: bool = False,
    preprocess: Preprocess | None = None,
    export_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Export ``prepared`` (see :func:`wsfold.prepare`), quantize the graph to static int8 on ``calibration``,
    check its structure and judge it on ``holdout`` (default: the last fifth of ``calibration``, not used to
    calibrate); write ``out`` only when it passes (or ``keep_failing``). ``prepared`` is not changed."""
    import shutil

    import onnx

    from ..io.paths import check_output, temp_folder
    from ..onnx.export import checked_save, export_onnx
    from ..verify.layers import layer_names
    from ..verify.runtimes.ort import ort_session

    _check_thresholds(min_sqnr, min_agreement, method)
    out = check_output(Path(out), force=force, source=prepared.source, suffixes=(".onnx",), option="--onnx")
    export_options = dict(export_options or {})
    preprocess = preprocess or declared_preprocess(prepared.model, prepared.source)
    if not export_options.get("input_shapes"):
        export_options.update(_shapes_from(prepared.model, Path(calibration), preprocess))
    with temp_folder(out) as tmp:
        work = tmp / "work"
        work.mkdir()
        float_path = work / "float.onnx"
        if progress:
            progress("export the float graph")
        export_onnx(prepared, float_path, **export_options)
        session = ort_session(float_path)
        specs = input_specs(session)
        del session
        cal = open_samples(Path(calibration), specs, "--calibration", preprocess)
        if holdout is not None:
            held = open_samples(Path(holdout), specs, "--holdout", preprocess)
            cal_stop, hold = cal.count, (held, 0, held.count)
            held_what = {"source": str(holdout), "samples": held.count}
        else:
            if cal.count < 2:
                raise OptionError(
                    f"--calibration {calibration} holds {cal.count} sample: none can be held out to judge the "
                    "int8 graph.",
                    "pass --holdout FILE, or store more samples.",
                )
            n_hold = max(1, round(cal.count * HOLDOUT_SHARE))
            cal_stop = cal.count - n_hold
            hold = (cal, cal_stop, cal.count)
            held_what = {
                "source": f"{calibration}, samples {cal_stop} to {cal.count - 1} (the last {HOLDOUT_SHARE:.0%}, not "
                "used to calibrate)",
                "samples": n_hold,
            }
        names = layer_names(prepared.model, float_path)
        by_layer = {v: k for k, v in names.items()}
        unknown = [e for e in exclude if e not in by_layer]
        if unknown:
            raise OptionError(
                f"--exclude {unknown[0]!r} names no conv/linear layer of the graph.",
                f"use the name of one of the model's conv/linear layers: {', '.join(list(by_layer)[:4])}, ...",
            )
        excluded_nodes = [by_layer[e] for e in exclude]
        batch = _batch_size(specs)
        reader = _Reader(cal, 0, cal_stop, batch)
        q_path = work / "int8.onnx"
        if progress:
            progress(f"calibrate ({method}) on {cal_stop} sample(s) and quantize")
        warned = quantize_graph(float_path, q_path, work, reader, method=method, exclude_nodes=excluded_nodes)
        counts, float_ops, failures = structure(q_path, names, set(excluded_nodes))
        failures += [f"onnxruntime's quantizer: {_named(m, names)}" for m in warned if _serious(m)]
        if progress:
            progress(f"judge on {held_what['samples']} held-out sample(s)")
        outputs = judge(prepared.model, q_path, hold[0], hold[1], hold[2], min_sqnr=min_sqnr,
                        min_agreement=min_agreement)  # fmt: skip
        failures += _constant_holdout(outputs, held_what)
        verdict = Int8Verdict(outputs, counts, float_ops, failures, held_what, min_sqnr, min_agreement)
        if not verdict.passed:
            if progress:
                progress("find the layers that lose most")
            # The debugging tools keep every intermediate tensor of both graphs for each sample: a few suffice.
            sample_stop = min(hold[2], hold[1] + 4)
            verdict.worst_layers = worst_layers(float_path, q_path, _Reader(hold[0], hold[1], sample_stop, batch),
                                                names, work, set(excluded_nodes))  # fmt: skip
        sizes = {"float": _size(float_path), "int8": _size(q_path)}
        placed = verdict.passed or keep_failing
        if placed:
            proto = onnx.load(str(q_path))
            checked_save(proto, out, tmp, external=False, force=force, keep=[p for p in (prepared.source,) if p])
        shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(
        verdict,
        out,
        placed,
        {"source": str(calibration), "samples": cal_stop, "method": method},
        sizes,
        list(exclude),
    )


def _shapes_from(model: torch.nn.Module, calibration: Path, preprocess: Preprocess | None) -> dict[str, Any]:
    """Input shapes (batch 1) and integer dtypes from the calibration file, for a model that declares no input
    size: the arrays named as forward's parameters, or the one array of a one-input file."""
    from ..inputs import forward_input_names
    from ..onnx.trace import declared_input_shape

    if declared_input_shape(model) is not None or getattr(model, "wsfold_input_shapes", None):
        return {}
    if calibration.is_dir():
        if preprocess is None:
            raise CalibrationError(
                f"--calibration {calibration} is a folder of images and the model declares no preprocessing (no "
                "input size, mean or std).",
                "pass --image-size H,W --mean M[,M,M] --std S[,S,S] as the model was trained.",
            )
        # The image channels: what the first convolution takes (1 for grayscale), else one per --mean value.
        first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        channels = first.in_channels if first is not None else max(len(preprocess.mean), 3)
        return {"input_shapes": [(1, channels, *preprocess.size)]}
    found = sample_shapes(calibration, "--calibration")
    if len(found) == 1:
        chosen = list(found.values())
    else:
        count = max(
            (n for n in range(1, len(found) + 1) if set(forward_input_names(model, n)) <= set(found)), default=0
        )
        chosen = [found[name] for name in forward_input_names(model, count)] if count else []
        if not chosen:
            wanted = ", ".join(forward_input_names(model, 1))
            raise CalibrationError(
                f"--calibration {calibration} has no array named as the model's input ({wanted}; it has: "
                f"{', '.join(found) or 'nothing'}).",
                "key the arrays by the model's input names, or pass --input-shape to name the graph's inputs.",
            )
    if any(len(shape) < 2 for shape, _ in chosen):
        return {}  # a sample of rank 0: export says that the input size is needed
    return {
        "input_shapes": [(1, *shape[1:]) for shape, _ in chosen],
        # int64/int32/bool arrays feed an integer input (a timestep, token ids); anything else a float one.
        "input_dtypes": [str(dtype) if str(dtype) in ("int64", "int32", "bool") else None for _, dtype in chosen],
    }


def _constant_holdout(outputs: list[OutputVerdict], holdout: dict[str, Any]) -> list[str]:
    if outputs and all(math.isnan(o.sqnr_db) for o in outputs):
        return [
            f"the {holdout['samples']} held-out samples are all identical (constant data): a verdict on them proves "
            "nothing; pass --holdout (or --inputs) with real samples"
        ]
    return []


def _batch_size(specs: list[InputSpec]) -> int:
    """The batch the graph takes: fixed by --static-batch (its dim 0), else 4: the calibration session holds a
    batch's activations (a ResNet-50 at 224x224 about 0.1 GB a sample), so peak memory grows with it."""
    fixed = {s.dims[0] for s in specs if s.dims and s.dims[0] is not None}
    return fixed.pop() if len(fixed) == 1 else 4


def _size(path: Path) -> int:
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _serious(message: str) -> bool:
    text = message.lower()
    return (
        ("not quantized" in text or "overflow" in text or "will not be quantized" in text)
        and "bias" in text
        or ("weight" in text and "not" in text and "quantiz" in text)
    )


def _named(message: str, names: dict[str, str]) -> str:
    for node, layer in names.items():
        if node in message:
            return message.replace(node, f"{node} (layer {layer})")
    return message


def is_qdq(onnx_path: Path) -> bool:
    """Whether the graph at ``onnx_path`` is a QDQ graph (it dequantizes something: weights, activations, or
    both; with every layer excluded only its activations are)."""
    from ..onnx.store import load_without_weights

    return any(node.op_type == "DequantizeLinear" for node in load_without_weights(onnx_path).graph.node)


def verify_int8(
    prepared: Prepared,
    onnx_path: str | Path,
    holdout: str | Path,
    *,
    min_sqnr: float = MIN_SQNR_DB,
    min_agreement: float = MIN_AGREEMENT,
) -> Int8Verdict:
    """Judge a QDQ int8 graph (as ``wsfold quantize`` writes) on ``holdout`` by quantize's verdict: SQNR and
    top-1 agreement of each output against the checkpoint's float output, and its structure."""
    from ..verify.layers import layer_names
    from ..verify.runtimes.ort import ort_session

    _check_thresholds(min_sqnr, min_agreement, "minmax")
    onnx_path = Path(onnx_path)
    session = ort_session(onnx_path)
    specs = input_specs(session)
    del session
    held = open_samples(Path(holdout), specs, "--inputs", declared_preprocess(prepared.model, prepared.source))
    names = layer_names(prepared.model, onnx_path)
    counts, float_ops, failures = structure(onnx_path, names, set())
    outputs = judge(prepared.model, onnx_path, held, 0, held.count, min_sqnr=min_sqnr, min_agreement=min_agreement)
    holdout_what = {"source": str(holdout), "samples": held.count}
    failures += _constant_holdout(outputs, holdout_what)
    return Int8Verdict(outputs, counts, float_ops, failures, holdout_what, min_sqnr, min_agreement)
