"""Replace each derived-weight layer with the plain torch.nn op of the same geometry holding its exact weight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NonFiniteError, WsfoldError
from ..io.memory import FilePages
from .detect import iter_layers
from .findings import DerivedLayer, Detection, add_finding
from .formulas import standardize_rounded
from .modeltree import copy_path, module_paths, require_module, set_submodule
from .modules import SamePad
from .probe import as_tuple, op_kind, own_tensors

_CONV = {
    "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d,
    "conv3d": nn.Conv3d,
    "conv_transpose1d": nn.ConvTranspose1d,
    "conv_transpose2d": nn.ConvTranspose2d,
    "conv_transpose3d": nn.ConvTranspose3d,
}
_PAD = {
    ("constant", 1): nn.ConstantPad1d,
    ("constant", 2): nn.ConstantPad2d,
    ("constant", 3): nn.ConstantPad3d,
    ("reflect", 1): nn.ReflectionPad1d,
    ("reflect", 2): nn.ReflectionPad2d,
    ("reflect", 3): nn.ReflectionPad3d,
    ("replicate", 1): nn.ReplicationPad1d,
    ("replicate", 2): nn.ReplicationPad2d,
    ("replicate", 3): nn.ReplicationPad3d,
    ("circular", 1): nn.CircularPad1d,
    ("circular", 2): nn.CircularPad2d,
    ("circular", 3): nn.CircularPad3d,
}


@dataclass
class BakedLayer:
    """One replaced layer: where its weight now lives and where it came from."""

    layer: DerivedLayer
    weight_key: str
    bias_key: str | None
    replaced_by: str


@dataclass
class BakeReport:
    """What bake_model did: the detection it worked from and each layer it replaced."""

    detection: Detection
    baked: list[BakedLayer] = field(default_factory=list)


def derived_weight(
    module: nn.Module, layer: DerivedLayer, exact: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias as the op receives them: the formula in float64 rounded once (``exact`` when
    detection already computed it), else as observed."""
    own = own_tensors(module)
    bias = own.get(layer.bias_is_param) if layer.bias_is_param else layer.observed_bias
    if layer.formula is None:
        return layer.observed_weight, bias
    if exact is not None:
        return exact, bias
    scale, shift = layer.formula.affine_tensors(own)
    raw = own[layer.source_param]
    # As in detection's own pass: a memory-mapped source weight's pages go back once read (the layer is replaced).
    rounded = standardize_rounded(raw, layer.formula, scale, shift, dtype=layer.dtype, done_rows=FilePages(raw).release)
    return rounded.weight, bias


def _plain_op(layer: DerivedLayer, weight: torch.Tensor, has_bias: bool) -> nn.Module:
    """The torch.nn conv/linear of the layer's geometry, on the meta device (its tensors are assigned after)."""
    g = layer.geometry
    kind = op_kind(layer.op)
    with torch.device("meta"):
        if kind == "linear":
            return nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        groups = g["groups"]
        if kind == "conv":
            in_ch, out_ch, extra = weight.shape[1] * groups, weight.shape[0], {}
        else:
            in_ch, out_ch = weight.shape[0], weight.shape[1] * groups
            extra = {"output_padding": g["output_padding"]}
        return _CONV[layer.op](
            in_ch,
            out_ch,
            tuple(weight.shape[2:]),
            stride=g["stride"],
            padding=g["padding"],
            dilation=g["dilation"],
            groups=groups,
            bias=has_bias,
            **extra,
        )


def build_plain(module: nn.Module, layer: DerivedLayer, exact: torch.Tensor | None = None) -> tuple[nn.Module, str]:
    """The plain module (with an explicit pad in front where needed) and the key prefix of its conv/linear."""
    weight, bias = derived_weight(module, layer, exact)
    op = _plain_op(layer, weight, bias is not None)
    # A recomputed weight is fresh; an observed one is still held by the detection record.
    op.weight = nn.Parameter(weight if layer.formula is not None else weight.detach().clone(), requires_grad=False)
    if bias is not None:
        op.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return _with_padding(op, layer)


def _with_padding(op: nn.Module, layer: DerivedLayer) -> tuple[nn.Module, str]:
    """``op`` with the layer's own padding: folded into the conv's padding where torch.nn can express it, else
    an explicit pad module in front (SamePad for TF-SAME padding that depends on the input size)."""
    pad, g = layer.pad, layer.geometry
    if pad is None:
        return op, ""
    nd = op.weight.ndim - 2
    if pad.same_dynamic:
        padder = SamePad(tuple(op.weight.shape[2:]), as_tuple(g["stride"], nd), as_tuple(g["dilation"], nd), pad.value)
        return nn.Sequential(padder, op), "1."
    pairs = [pad.pad[i : i + 2] for i in range(0, len(pad.pad), 2)]
    symmetric = all(a == b for a, b in pairs) and len(pairs) == nd and isinstance(g["padding"], (int, tuple))
    is_conv = op_kind(layer.op) == "conv"
    conv_padding = as_tuple(g["padding"], nd) if is_conv and not isinstance(g["padding"], str) else None
    if symmetric and conv_padding is not None and (pad.mode != "constant" or pad.value == 0.0):
        if pad.mode == "constant" or all(p == 0 for p in conv_padding):
            op.padding = tuple(p + a for p, (a, _) in zip(conv_padding, reversed(pairs)))
            op.padding_mode = "zeros" if pad.mode == "constant" else pad.mode
            op._reversed_padding_repeated_twice = tuple(v for p in reversed(op.padding) for v in (p, p))
            return op, ""
    cls = _PAD.get((pad.mode, nd)) if len(pairs) == nd else None
    if cls is None:
        raise WsfoldError(f"layer {layer.name}: cannot express padding {pad} with torch.nn modules")
    padder = cls(pad.pad, pad.value) if pad.mode == "constant" else cls(pad.pad)
    return nn.Sequential(padder, op), "1."


def bake_model(
    model: nn.Module,
    detection: Detection | None = None,
    *,
    inplace: bool = False,
    allow_nonfinite: bool = False,
    weight_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, BakeReport]:
    """Return ``model`` with every detected derived-weight layer replaced by a plain op; the input is untouched
    unless ``inplace`` (untouched submodules and tensors are shared with it). Unsupported layers stay as they
    are and are listed in the report.

    Without a ``detection``, each layer is baked as soon as it is found, from the weight its detection already
    computed, so a large model is never held twice and no weight is standardized twice. ``progress`` then
    counts the modules probed, else the layers baked. A layer whose weight holds NaN or inf raises
    NonFiniteError unless ``allow_nonfinite`` (then it is baked as it is). ``weight_dtype`` rounds each identified
    formula's weight to that dtype instead of the layer's (float64: not rounded at all)."""
    require_module(model, "bake_model")
    if detection is not None and not isinstance(detection, Detection):
        raise TypeError(f"bake_model's detection must be a Detection, not {type(detection).__name__}")
    baking = _Baking(model, inplace, allow_nonfinite)
    if detection is not None:
        for i, layer in enumerate(detection.layers):
            baking.bake(layer)
            if progress:
                progress(i + 1, len(detection.layers))
        return baking.model, BakeReport(detection, baking.baked)
    flags = {n: m.training for n, m in model.named_modules()}
    detection = Detection([], [], [])
    # In place, the model is the caller's to change: an exact weight may then reuse the memory of the weight
    # the layer's own code computed.
    layers = iter_layers(
        model, exact_weights=True, weight_dtype=weight_dtype, progress=progress, reuse_observed=inplace
    )
    for found in layers:
        add_finding(detection, found.result)
        if isinstance(found.result, DerivedLayer):
            baking.bake(found.result, found.weight)
        del found
    # Layers were replaced (and paths copied) while the model was in eval mode for probing: give each module
    # its own mode back, and a replacement (and its children) the mode of the layer it replaced.
    modes: dict[str, bool] = {}
    for name, m in baking.model.named_modules():
        modes[name] = flags.get(name, modes.get(name.rpartition(".")[0], m.training))
        m.training = modes[name]
    return baking.model, BakeReport(detection, baking.baked)


class _Baking:
    """Replaces layers one at a time. Unless ``inplace``, the module objects on the path to a replaced layer are
    copied first (so the input model is not reached); all tensors and untouched modules are shared. Each
    replacement takes the train/eval mode of the layer it replaces."""

    def __init__(self, model: nn.Module, inplace: bool, allow_nonfinite: bool) -> None:
        self.model = model
        self.inplace = inplace
        self.allow_nonfinite = allow_nonfinite
        self.copied: dict[str, nn.Module] = {}
        self.baked: list[BakedLayer] = []
        # A module used at several places (tied) is replaced at every one of them.
        self.paths = module_paths(model)

    def bake(self, layer: DerivedLayer, exact: torch.Tensor | None = None) -> None:
        if any(layer.name.startswith(b.layer.name + ".") or b.layer.name == "" for b in self.baked):
            return  # inside a layer already replaced
        if layer.nonfinite and not self.allow_nonfinite:
            raise NonFiniteError(
                f"layer {layer.name or '(root)'} ({layer.type}) has a non-finite weight: "
                + next(w for w in layer.warnings if w.startswith("non-finite")).removeprefix("non-finite: ")
                + "; the baked model would compute NaN.",
                "fix the checkpoint, or pass --allow-nonfinite to bake the layer as it is.",
            )
        if not self.inplace and layer.name:
            self.model = copy_path(self.model, layer.name, self.copied)
        module = self.model.get_submodule(layer.name) if layer.name else self.model
        new, prefix = build_plain(module, layer, exact)
        new.train(module.training)
        for name in self.paths.get(id(module), [layer.name]):
            if not self.inplace and name:
                self.model = copy_path(self.model, name, self.copied)
            self.model = set_submodule(self.model, name, new)
        base = f"{layer.name}." if layer.name else ""
        has_bias = new.state_dict().get(f"{prefix}bias") is not None
        self.baked.append(
            BakedLayer(layer, f"{base}{prefix}weight", f"{base}{prefix}bias" if has_bias else None, type(new).__name__)
        )
