"""What the exporter is handed: a private copy of the model at the export dtype, example inputs, names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..bake.modeltree import copy_paths, model_dtype, set_eval, structural_copy
from ..errors import ExportError, OptionError, first_line
from ..inputs import (
    ValueRange,
    check_names,
    forward_input_names,
    parse_dtype,
    parse_float_dtype,
    parse_shape,
    per_input,
    random_tensor,
)
from ..io.memory import released_after_call


def declared_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The input size a model declares (timm pretrained_cfg/default_cfg, transformers config), batch 1."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return (1, *(int(v) for v in cfg["input_size"]))
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if size and channels:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (1, int(channels), int(h), int(w))
    return None


def resolve_input_shapes(model: nn.Module, shapes: Sequence[str | tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    if shapes and any(isinstance(s, int) for s in shapes):
        raise TypeError(f"input_shapes is a list of shapes, one per input, such as [{tuple(shapes)}]")
    if shapes:
        return [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]
    captured = getattr(model, "wsfold_input_shapes", None)  # a .pt2 program's, as it was captured
    if captured:
        return [tuple(s) for s in captured]
    declared = declared_input_shape(model)
    if declared is None:
        raise OptionError(
            "the model does not declare its input size.",
            "pass --input-shape, e.g. --input-shape 1,3,224,224 (repeat it for several inputs).",
        )
    return [declared]


def flatten_outputs(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Output names and tensors in the order an exporter flattens them."""
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if isinstance(out, dict):
        names, tensors = [], []
        for k, v in out.items():
            sub_names, sub = flatten_outputs(v)
            names += [str(k) if len(sub) == 1 else f"{k}_{n}" for n in sub_names]
            tensors += sub
        return names, tensors
    if isinstance(out, (tuple, list)):
        names, tensors = [], []
        for v in out:
            _, sub = flatten_outputs(v)
            names += [f"output_{len(tensors) + j}" for j in range(len(sub))]
            tensors += sub
        return names, tensors
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return flatten_outputs(dict(out))
    raise ExportError(
        f"the model returns a {type(out).__name__}; wsfold exports tensors, tuples and dicts of tensors.",
        "wrap the model so that forward returns tensors only.",
    )


def freeze_same_pads(model: nn.Module, args: tuple[torch.Tensor, ...]) -> nn.Module:
    """With static spatial dims, TF-SAME padding is a constant: replace each SamePad by the torch.nn pad it
    amounts to at this input size (the exported graph then has no shape arithmetic). Returns a copy."""
    from ..bake.modules import SamePad, tf_same_pad

    names = [n for n, m in model.named_modules() if isinstance(m, SamePad)]
    if not names:
        return model
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda mod, inp, n=n: sizes.__setitem__(n, tuple(inp[0].shape))
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    frozen = copy_paths(model, set(sizes))
    pad_cls = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}
    for name, shape in sizes.items():
        m = model.get_submodule(name)
        nd = len(m.kernel_size)
        pads = tf_same_pad(shape[-nd:], m.kernel_size, m.stride, m.dilation)
        parent, _, leaf = name.rpartition(".")
        setattr(frozen.get_submodule(parent) if parent else frozen, leaf, pad_cls[nd](pads, m.value))
    return frozen


class _Modeless(nn.Module):
    """Holds a torch.export program's module, which refuses train()/eval() (the TorchScript exporter calls
    them): only this wrapper's own flag changes."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> _Modeless:
        self.training = mode
        return self

    def forward(self, *args):
        return self.module(*args)


def _refuses_modes(model: nn.Module) -> bool:
    try:
        model.train(model.training)
    except NotImplementedError:
        return True
    return False


@dataclass
class TraceInputs:
    """What the exporter is handed: a private copy of the model (export dtype, eval mode, static pads frozen),
    example inputs, and the graph's input and output names."""

    model: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    notes: list[str] = field(default_factory=list)
    # The precision the weights were rounded to (export --dtype; bfloat16 is written as float32), when recorded.
    weights_dtype: torch.dtype | None = None

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def export_dtype(model: nn.Module, dtype: torch.dtype | str | None, notes: list[str]) -> torch.dtype:
    """The floating dtype the graph computes in: ``dtype`` if given, else the model's (bfloat16 widens to float32:
    ONNX Conv has no bfloat16, and widening the baked weights is exact)."""
    if dtype is not None:
        dtype = parse_float_dtype(dtype)
    else:
        dtype = model_dtype(model)
    if dtype == torch.bfloat16:
        notes.append("bfloat16 model exported as float32 (ONNX Conv has no bfloat16; the weights widen exactly)")
        dtype = torch.float32
    return dtype


def trace_inputs(
    model: nn.Module,
    input_shapes: list[tuple[int, ...]],
    input_dtypes: Sequence[torch.dtype | str | None] | torch.dtype | str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    input_names: Sequence[str] | None = None,
    value_ranges: Sequence[ValueRange | None] | None = None,
    dynamic_batch: bool,
    dynamic_hw: bool,
) -> TraceInputs:
    """Prepare the model and example inputs for the exporter without changing ``model``: a structural copy that
    shares its tensors, or holds converted ones when the export ``dtype`` differs. Floating inputs default to
    the export dtype; integer and bool inputs keep theirs."""
    notes: list[str] = []
    dtype = export_dtype(model, dtype, notes)
    private = set_eval(structural_copy(model, dtype if dtype != model_dtype(model) else None))
    if _refuses_modes(private):
        private = _Modeless(private)
    count = len(input_shapes)
    if isinstance(input_dtypes, (str, torch.dtype)):
        input_dtypes = [input_dtypes]
    kinds = [parse_dtype(d) if d is not None else dtype for d in per_input(input_dtypes, count, "--input-dtype")]
    ranges = per_input(value_ranges, count, "--input-range")
    trace_batch = 2 if dynamic_batch and input_shapes[0][0] == 1 else None
    gen = torch.Generator().manual_seed(0)
    try:
        args = tuple(
            random_tensor((trace_batch, *s[1:]) if trace_batch else s, kind, gen, rng)
            for s, kind, rng in zip(input_shapes, kinds, ranges)
        )
    except (MemoryError, RuntimeError) as exc:
        raise OptionError(
            f"example inputs of shape {', '.join(map(str, input_shapes))} cannot be made ({first_line(exc)}).",
            "use a smaller --input-shape.",
        ) from None
    # A checkpoint loaded with mmap: each layer's pages are handed back once it has run, so the run does not leave
    # the whole file resident (the exporter reads it again, as it writes the weights).
    with torch.no_grad(), released_after_call(private):
        try:
            if not dynamic_hw:
                private = freeze_same_pads(private, args)
            reference = private(*args)
        except Exception as exc:  # noqa: BLE001 - the user's shapes may not fit the model
            given = ", ".join(f"{tuple(s)} {str(k).removeprefix('torch.')}" for s, k in zip(input_shapes, kinds))
            raise OptionError(
                f"the model cannot run on inputs {given} ({type(exc).__name__}: {first_line(exc)}).",
                "fix --input-shape / --input-dtype (one per input, in forward's order).",
            ) from None
    if dynamic_hw:
        _require_another_size(private, args, kinds, ranges, gen)
    output_names, _ = flatten_outputs(reference)
    names = check_names(input_names, count) if input_names else forward_input_names(model, count)
    clash = sorted(set(names) & set(output_names))
    if clash:
        raise OptionError(
            f"input name {clash[0]!r} is also the name of an output.", "choose another name with --input-name."
        )
    weights = model_dtype(model)
    return TraceInputs(private, args, names, output_names, notes, weights if weights != dtype else None)


def _require_another_size(model: nn.Module, args, kinds, ranges, gen: torch.Generator) -> None:
    """--dynamic-hw only for a model that runs at another spatial size: one that fixes its size (a position
    embedding of fixed length) would keep the exporter's shape solver busy for minutes before it refused. A U-Net
    takes multiples of its downsampling only, so a few growths are tried."""
    spatial = [a.ndim >= 3 for a in args]
    if not any(spatial):
        return
    largest = max(max(a.shape[2:]) for a, s in zip(args, spatial) if s)
    for grow in dict.fromkeys([1, 2, 4, 8, 16, 32, largest]):
        grown = tuple(
            random_tensor((*a.shape[:2], *(d + grow for d in a.shape[2:])), kind, gen, rng) if s else a
            for a, s, kind, rng in zip(args, spatial, kinds, ranges)
        )
        try:
            with torch.no_grad(), released_after_call(model):
                model(*grown)
        except Exception:  # noqa: BLE001 - the model refuses that size: try the next
            continue
        return
    sizes = ", ".join("x".join(map(str, a.shape[2:])) for a, s in zip(args, spatial) if s)
    raise OptionError(
        f"--dynamic-hw: the model has fixed spatial sizes (it runs at {sizes} only, and refused every size from 1 "
        f"to {largest} larger).",
        "export without --dynamic-hw.",
    )


def _has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
