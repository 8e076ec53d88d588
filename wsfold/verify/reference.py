"""The checkpoint's own model as the reference: at its dtype, in float64, and at the graph's precision."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bake.modeltree import (
    default_dtype,
    model_dtype,
    set_eval,
    set_submodule,
    structural_copy,
    widened_on_call,
)
from ..bake.probe import own_tensors, probe_shapes, run_probe
from ..errors import VerifyInputError, first_line
from ..io.memory import release_file_pages
from .feeds import _as_args

if TYPE_CHECKING:
    from ..bake.findings import Detection


def float64_reference(model: nn.Module, detection: Detection) -> tuple[nn.Module, list[str]]:
    """A copy of the original model that computes, in float64, the same function as at its own dtype. It shares
    the model's tensors and is run with ``widened_on_call`` (see _References): no float64 copy of the whole
    model is made unless its code needs one.

    A layer whose math depends on the input dtype (eps 1e-5 for float32, 1e-3 otherwise) would compute another
    function in float64: such layers get their weight from the formula observed at the model's dtype instead.
    Returns the copy and the names of the layers so replaced.
    """
    from ..bake.baker import build_plain
    from ..bake.formulas import standardize_rounded

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


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, NaN equal to NaN (an overflow is the same on both runs; the overflow check reports it)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _evaluate(model: nn.Module, args: tuple[torch.Tensor, ...]):
    from ..onnx.trace import flatten_outputs

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

    def evaluate_at(self, dtype: torch.dtype, arrays: list) -> list[torch.Tensor]:
        """The checkpoint's math at a lower precision ``dtype``: the graph's own (a copy of the model at that
        dtype), or a runtime's (bf16 chosen by OpenVINO: the model under CPU autocast, which runs convolutions
        and matrix products in ``dtype`` as such a runtime does, and lets what the model builds at the default
        dtype meet its weights)."""
        if self.at_graph_dtype is not None and dtype == self.graph_dtype:
            return _evaluate(self.at_graph_dtype, _as_args(arrays, dtype))[1]
        with torch.autocast("cpu", dtype=dtype):
            outputs = _evaluate(self.model, _as_args(arrays, model_dtype(self.model)))[1]
        return [t.float() if t.is_floating_point() else t for t in outputs]
