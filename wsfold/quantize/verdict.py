"""The int8 verdict: the quantized graph's structure, and its accuracy on held-out data against the checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CalibrationError, OptionError, first_line
from .data import InputSpec, Samples, open_samples
from .images import declared_preprocess

if TYPE_CHECKING:
    from ..pipeline import Prepared


METHODS = ("minmax", "percentile", "entropy")
# Defaults from measurements (docs/int8.md): the trained digits fixture quantizes at 33.7 dB with 100% top-1
# agreement on its 597 held-out images; calibrated on all-zero data instead, at 1.3 dB and 40% agreement.
MIN_SQNR_DB = 20.0
MIN_AGREEMENT = 0.97
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
    reader,  # int8._Reader: rewound and iterated by onnxruntime's debugging tools
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


def failure_line(verdict: Int8Verdict) -> str:
    """Why an int8 verdict failed, in one line."""
    why = verdict.failures[0] if verdict.failures else "an output is under the thresholds"
    return f"the int8 graph failed its verdict: {why}"


def _constant_holdout(outputs: list[OutputVerdict], holdout: dict[str, Any]) -> list[str]:
    if outputs and all(math.isnan(o.sqnr_db) for o in outputs):
        return [
            f"the {holdout['samples']} held-out samples are all identical (constant data): a verdict on them proves "
            "nothing (were the calibration samples constant too?); pass real held-out samples"
        ]
    return []


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
