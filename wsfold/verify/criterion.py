"""The pass rule: each output of the graph against the checkpoint at its own dtype and in float64."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VerifyInputError

SAFETY = 4.0
FLOOR_ULPS = 8.0


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
    # The checkpoint's own error at the precision the graph was judged at (its dtype's, or the runtime's).
    r_own = r32 if r_graph is None else r_graph.detach().double()
    e_ref = float((r_own - ref64).abs().max()) if diff.numel() else 0.0
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


# Ops that keep an output's layout: through them, an output is still the convolution's (N, C, ...).
_LAYOUT_KEEPING = {
    "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Gelu", "Softplus", "Mish", "Clip", "Identity", "Cast", "Erf", "Neg", "Abs", "Exp", "Sqrt",
}  # fmt: skip


def conv_outputs(onnx_path: Path) -> set[str]:
    """The graph outputs that a Conv/ConvTranspose computes (through elementwise ops): their dim 1 holds channels.
    A (N, H, W) depth map or (N, tokens, dim) output does not, though it has the rank of a 1-D conv's output."""
    from ..onnx.store import load_without_weights

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
