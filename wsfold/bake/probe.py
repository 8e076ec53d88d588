"""Running one module alone on a probe input while recording the conv/linear/pad calls it makes itself.

A recorded conv/linear is not computed: its output is a stand-in of the right shape (the op run on an empty batch)
filled with random numbers, so that probing costs what the layer's own weight code costs and no convolution over
a wide layer. Random values keep "the module returns the op's output" checkable.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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
_GEOMETRY_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def op_kind(op: str) -> str:
    return "linear" if op == "linear" else ("conv_transpose" if op.startswith("conv_transpose") else "conv")


@dataclass
class OpCall:
    """One recorded call: the op's name, its arguments by parameter name, and what it returned."""

    op: str
    args: dict[str, Any]
    output: Any

    @property
    def is_op(self) -> bool:
        """A conv/linear call (not a pad)."""
        return self.op in OPS

    def geometry(self) -> dict[str, Any]:
        """stride, padding, dilation, groups (and output_padding) as plain Python values."""
        names = _SIGNATURES[op_kind(self.op)][3:]
        return {k: _static(self.args.get(k, _GEOMETRY_DEFAULTS[k])) for k in names}


@dataclass
class ProbeRun:
    """One call of a module on a probe input: the input, the module's output and the calls it made itself."""

    shape: tuple[int, ...]
    input: torch.Tensor
    output: Any
    calls: list[OpCall]

    @property
    def ops(self) -> list[OpCall]:
        return [c for c in self.calls if c.is_op]


class Recorder(TorchFunctionMode):
    """Records conv/linear/pad calls made directly by the probed module (``depth`` 0: not by a descendant that
    owns parameters), returning a random stand-in instead of computing a conv/linear."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[OpCall] = []
        self.depth = 0
        self._gen = torch.Generator().manual_seed(1234)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        recorded = self.depth == 0 and (name in OPS or name == "pad")
        out = self._stand_in(func, args, kwargs) if recorded and name in OPS else func(*args, **kwargs)
        if recorded:
            names = _SIGNATURES["pad" if name == "pad" else op_kind(name)]
            bound = dict(zip(names, args))
            bound.update(kwargs)
            self.calls.append(OpCall(name, bound, out))
        return out

    def _stand_in(self, func, args, kwargs):
        # The op run on an empty batch checks every shape and gives the output's, at no cost.
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        batched = isinstance(w, torch.Tensor) and (x.ndim >= 2 if w.ndim == 2 else x.ndim == w.ndim)
        if not isinstance(x, torch.Tensor) or not batched or x.shape[0] == 0:
            return func(*args, **kwargs)
        empty = x[:0]
        try:
            if args:
                shaped = func(empty, *args[1:], **kwargs)
            else:
                shaped = func(*args, **{**kwargs, "input": empty})
        except Exception:  # noqa: BLE001 - let the real op speak for itself
            return func(*args, **kwargs)
        shape = (x.shape[0], *shaped.shape[1:])
        return torch.randn(shape, generator=self._gen).to(shaped.dtype)


def run_probe(
    module: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    overrides: dict[str, torch.Tensor] | None = None,
) -> ProbeRun:
    """Call ``module`` on a seeded random input of ``shape`` (with ``overrides`` substituted for its tensors)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    recorder = Recorder()
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
    return ProbeRun(tuple(shape), x, out, recorder.calls)


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's), parametrized originals included."""
    tensors = dict(module.named_parameters(recurse=False))
    tensors.update(module.named_buffers(recurse=False))
    plist = getattr(module, "parametrizations", None)
    if plist is not None:
        for pname, entry in plist.items():
            for sub, t in entry.named_parameters(recurse=False):
                tensors[f"parametrizations.{pname}.{sub}"] = t
    return {k: v for k, v in tensors.items() if v is not None}


def probe_shapes(module: nn.Module, weight_shape: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
    """Input shapes to try for a module whose op weight has ``weight_shape``, as pairs of two different sizes,
    most plausible first."""
    if hasattr(module, "in_features"):
        return [[(2, module.in_features), (3, module.in_features)]]
    nd = len(weight_shape) - 2
    if nd <= 0:
        return [[(2, weight_shape[-1]), (3, weight_shape[-1])]] if len(weight_shape) == 2 else []
    ks = list(weight_shape[2:])
    stride = as_tuple(getattr(module, "stride", 1), nd)
    dilation = as_tuple(getattr(module, "dilation", 1), nd)
    # Small spatial sizes keep the probe convolutions cheap on wide layers; two sizes of different parity
    # reveal padding that depends on the input size.
    sizes = [max(4, (k - 1) * d + 1 + s) for k, d, s in zip(ks, dilation, stride)]
    channels = []
    if isinstance(getattr(module, "in_channels", None), int):
        channels.append(module.in_channels)
    groups = getattr(module, "groups", 1) if isinstance(getattr(module, "groups", 1), int) else 1
    channels += [weight_shape[1] * groups, weight_shape[0], weight_shape[1]]
    return [[(1, c, *sizes), (2, c, *[s + 1 for s in sizes])] for c in dict.fromkeys(channels)]


def as_tuple(value: Any, n: int) -> tuple[int, ...]:
    """An int or a sequence of ints as an n-tuple (ones when it is neither)."""
    if isinstance(value, int):
        return (value,) * n
    try:
        t = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return (1,) * n
    return t if len(t) == n else (t[0],) * n


def _static(value: Any) -> Any:
    return tuple(value) if isinstance(value, (torch.Size, list)) else value


class TensorSet:
    """The model's parameters and buffers, by identity, without keeping them alive: a layer baked on the way
    frees its tensors, and a fresh tensor at a recycled address must not pass for one of them."""

    def __init__(self, model: nn.Module) -> None:
        tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
        tensors += [t for _, t in model.named_buffers(remove_duplicate=False) if t is not None]
        self._by_id = weakref.WeakValueDictionary({id(t): t for t in tensors})

    def __contains__(self, tensor: object) -> bool:
        return self._by_id.get(id(tensor)) is tensor

    def holds_storage(self, data_ptr: int) -> bool:
        """Whether a tensor of the set that is still alive has its storage at ``data_ptr``."""
        return any(t.untyped_storage().data_ptr() == data_ptr for t in list(self._by_id.values()))
