"""Quantize a baked graph to static int8 with onnxruntime.quantization (QDQ, per-channel symmetric int8 weights,
int8 activations), then hand it to the verdict (verdict.py) before it is placed."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CalibrationError, OptionError, QuantizeError, WsfoldError, first_line
from .data import InputSpec, Samples, open_samples, sample_shapes
from .images import Preprocess, declared_preprocess

if TYPE_CHECKING:
    from ..pipeline import Prepared
from .verdict import (
    MIN_AGREEMENT,
    MIN_SQNR_DB,
    QUANTIZED_OPS,
    Int8Verdict,
    _check_thresholds,
    _constant_holdout,
    input_specs,
    judge,
    structure,
    worst_layers,
)

# onnxruntime 1.32's quantize_static runs entropy calibration with 128 histogram bins and 128 quantized bins and
# cannot be told otherwise: its KL search then has one candidate, the full range (minmax's scales, measured
# byte-identical). wsfold runs onnxruntime's entropy calibrator itself with 2048 bins (TensorRT's choice) and hands
# the ranges to quantize_static as TensorQuantOverrides.
ENTROPY_BINS = 2048
HOLDOUT_SHARE = 0.2  # of CAL, when no --holdout is given


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
    # onnxruntime's quantizer calibrates and quantizes float32 graphs: a float16/bfloat16 checkpoint is exported
    # widened (exactly) to float32 first.
    export_options.setdefault("dtype", torch.float32)
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
        if not verdict.passed and not any("all identical" in f for f in verdict.failures):
            if progress:
                progress("find the layers that lose most")
            # The debugging tools keep every intermediate tensor of both graphs for each sample: a few suffice.
            sample_stop = min(hold[2], hold[1] + 4)
            verdict.worst_layers = _ranked_or_none(float_path, q_path, _Reader(hold[0], hold[1], sample_stop, batch),
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


def _ranked_or_none(*args, **kwargs) -> list[dict[str, Any]]:
    """The layers that lose most, or none when onnxruntime's debugging tools cannot pair the two graphs' tensors:
    the ranking explains a failed verdict, it is not one."""
    try:
        return worst_layers(*args, **kwargs)
    except (KeyError, ValueError, RuntimeError):
        return []


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
