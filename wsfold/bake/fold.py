"""Fold inference-static normalizers into the baked convolutions and linear layers.

Runs after baking, never into a layer that still standardizes (folding into a WS layer's raw weight is undone by
its next standardization). Adjacency comes from a torch.fx trace, not module order; a conv whose output has other
users is not folded. A module is folded as a normalizer when probing proves it is a per-channel affine map in
eval mode (BatchNorm with running statistics, frozen BN, the batch half of Batch-Channel Normalization, ...).

Folding is planned, then applied: ``plan_folds`` reads the traced graph and returns FoldSteps (and the reasons
for what it will not fold); ``apply_folds`` carries them out on a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import brief, first_line
from .modeltree import copy_paths, require_module, set_submodule

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_NORMS = (nn.GroupNorm, nn.LayerNorm)

# Each kind of fold, and on which side of its layer the normalizer stands: "after" folds a * y + b into the
# layer's output (the normalizer becomes Identity); "before" folds the normalizer's affine into the layer's input
# (the normalizer keeps its statistics and loses its affine).
FOLD_KINDS = {
    "batchnorm": "after",
    "frozen batchnorm": "after",
    "batch-channel-norm (batch part)": "after",
    "per-channel affine": "after",
    "groupnorm-affine": "before",
    "layernorm-affine": "before",
}


# FoldReport.skipped when folding was not asked for.
NOT_ASKED = "--no-fold"


@dataclass(frozen=True)
class Folded:
    """One normalizer (or its affine) folded into a layer."""

    norm: str
    into: str
    kind: str  # a key of FOLD_KINDS

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class NotFolded:
    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class FoldReport:
    folded: list[Folded] = field(default_factory=list)
    not_folded: list[NotFolded] = field(default_factory=list)
    skipped: str | None = None  # why folding did not run at all

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [f.to_dict() for f in self.folded],
            "not_folded": [n.to_dict() for n in self.not_folded],
            "fold_skipped": self.skipped,
        }


@dataclass
class FoldStep:
    """A planned fold: the per-channel ``scale`` and ``shift`` (float64) that ``norm`` applies, into ``into``."""

    norm: str
    into: str
    kind: str
    scale: torch.Tensor
    shift: torch.Tensor

    def record(self) -> Folded:
        return Folded(self.norm, self.into, self.kind)


class _LeafTracer(fx.Tracer):
    """Keeps every module without children opaque, so a custom normalizer is one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    return _LeafTracer().trace(model)


def _probe_magnitudes(dtype: torch.dtype) -> tuple[float, ...]:
    """Input scales for proving a map affine: from small to far beyond any plausible activation (a learnable
    clip such as PACT's clamp(x, max=alpha) with alpha ~20 is affine on small inputs only), within the dtype."""
    top = 1e6 if torch.finfo(dtype).max > 1e10 else 1e3
    return (1e-3, 1.0, 12.0, 1e3, top)


def per_channel_affine(
    module: nn.Module, channels: int, ndim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) such that module(x) == a_c * x + b_c for every input, or None. Found from module(0) and module(1),
    then proven on random inputs at every scale of _probe_magnitudes, each to a few ulp of its own output."""
    shape = (2, channels, *([5] * ndim))
    gen = torch.Generator().manual_seed(7)
    tol = 64 * torch.finfo(dtype).eps
    try:
        with torch.no_grad():
            b = module(torch.zeros(shape, dtype=dtype)).double()
            a = module(torch.ones(shape, dtype=dtype)).double() - b
            if b.shape != shape:
                return None
            dims = [0, *range(2, b.ndim)]
            a_c, b_c = a.mean(dim=dims), b.mean(dim=dims)
            view = (1, channels, *([1] * ndim))
            for magnitude in _probe_magnitudes(dtype):
                for size in (5, 4):
                    x = (magnitude * torch.randn((3, channels, *([size] * ndim)), generator=gen)).to(dtype)
                    y = module(x).double()
                    if y.shape != x.shape:
                        return None
                    expected = a_c.view(view) * x.double() + b_c.view(view)
                    scale = max(float(y.abs().max()), float(expected.abs().max()), 1e-30)
                    if not float((expected - y).abs().max()) <= tol * scale:
                        return None
    except Exception:  # noqa: BLE001 - a module that cannot take this input is not a per-channel affine map
        return None
    return a_c, b_c


def _module_kind(name: str, module: nn.Module, model: nn.Module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if "batchchannel" in type(parent).__name__.lower():
        return "batch-channel-norm (batch part)"
    buffers = {k for k, _ in module.named_buffers(recurse=False)}
    if {"running_mean", "running_var"} <= buffers:
        return "frozen batchnorm"
    return "per-channel affine"


def _is_bn_like(module: nn.Module) -> bool:
    buffers = {k for k, _ in module.named_buffers(recurse=False)}
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or bool(
        buffers & {"running_mean", "running_var", "exp_mean", "exp_var"}
    )


def _fold_output_affine(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """layer(x) -> a * layer(x) + b, exactly in float64 then rounded once."""
    w = layer.weight.detach().double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        w = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:]) * a.reshape(g, 1, -1, *([1] * (w.ndim - 2)))
        w = w.reshape(layer.weight.shape)
    else:
        w = w * a.reshape(-1, *([1] * (w.ndim - 1)))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(a)
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    layer.bias = nn.Parameter((bias * a + b).to(dtype), requires_grad=False)


def _fold_input_affine(layer: nn.Module, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """layer(gamma * x + beta) -> layer'(x), for a linear layer or a conv without zero padding (or zero beta)."""
    w = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if isinstance(layer, nn.Linear):
        new_w = w * gamma[None, :]
        new_b = bias + w @ beta
    else:
        g = layer.groups
        cin_g = w.shape[1]
        gamma_g = gamma.reshape(g, cin_g)
        beta_g = beta.reshape(g, cin_g)
        out_g = w.shape[0] // g
        wg = w.reshape(g, out_g, cin_g, *w.shape[2:])
        per_input = (g, 1, cin_g) + (1,) * (w.ndim - 2)
        new_w = (wg * gamma_g.reshape(per_input)).reshape(w.shape)
        shift = (wg * beta_g.reshape(per_input)).sum(dim=tuple(range(2, wg.ndim))).reshape(-1)
        new_b = bias + shift
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(new_w.to(dtype), requires_grad=False)
    layer.bias = nn.Parameter(new_b.to(dtype), requires_grad=False)


def _affine_foldable_into(norm: nn.Module, nxt: nn.Module) -> str | None:
    """Why the norm's affine cannot fold into ``nxt``, or None when it can."""
    beta = norm.bias
    if isinstance(norm, nn.LayerNorm):
        if not isinstance(nxt, nn.Linear) or tuple(norm.normalized_shape) != (nxt.in_features,):
            return "its affine only folds into a Linear over the normalized dimension"
        return None
    if isinstance(nxt, nn.Linear) or isinstance(nxt, nn.modules.conv._ConvTransposeNd):
        return f"its affine does not fold exactly into a {type(nxt).__name__} after a GroupNorm"
    padding = nxt.padding if isinstance(nxt.padding, tuple) else (nxt.padding,)
    padded = nxt.padding == "same" or any(p != 0 for p in padding if isinstance(p, int))
    if padded and nxt.padding_mode != "zeros":
        return f"the next conv pads with {nxt.padding_mode!r}: folding the affine would change the padded values"
    if padded and beta is not None and bool((beta != 0).any()):
        return "the next conv zero-pads and beta is not zero: the fold would not be exact at the borders"
    return None


def strip_affine(norm: nn.Module) -> nn.Module:
    """The GroupNorm/LayerNorm without its affine (same statistics and eps)."""
    if isinstance(norm, nn.GroupNorm):
        return nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)
    return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)


def _without_norm(norm: nn.Module, kind: str) -> nn.Module:
    """What stands in the normalizer's place once it is folded."""
    return nn.Identity() if FOLD_KINDS[kind] == "after" else strip_affine(norm)


class _Graph:
    """The traced model as the planner needs it: modules by name, how often each is called, and the producer of
    a node's input."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.graph = graph
        self.modules = dict(model.named_modules())
        self.calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def module_nodes(self) -> Iterable[fx.Node]:
        return (n for n in self.graph.nodes if n.op == "call_module")

    def module_of(self, node: fx.Node | None) -> nn.Module | None:
        return self.modules.get(node.target) if node is not None and node.op == "call_module" else None


def _plan_output_fold(g: _Graph, node: fx.Node, model: nn.Module) -> FoldStep | NotFolded | None:
    """A normalizer after a conv/linear: a FoldStep when it is a per-channel affine map in eval mode, a NotFolded
    when it looks like a normalizer but cannot fold, None when it is something else."""
    name, module = node.target, g.modules[node.target]
    bn_like = _is_bn_like(module)
    owns_tensors = next(module.parameters(recurse=False), None) is not None or (
        next(module.buffers(recurse=False), None) is not None
    )
    if isinstance(module, (*_FOLD_INTO, *_NORMS)) or not (bn_like or owns_tensors):
        return None
    producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    prev = g.module_of(producer)

    def refuse(reason: str) -> NotFolded | None:
        return NotFolded(name, reason) if bn_like else None

    if not isinstance(prev, _FOLD_INTO):
        return refuse("its input is not the output of a conv or linear layer")
    if module.training:
        return NotFolded(name, "it is in training mode (call model.eval())")
    if len(producer.users) > 1:
        others = ", ".join(str(u.target if u.op == "call_module" else u.name) for u in producer.users if u is not node)
        return NotFolded(name, f"the output of {producer.target} also feeds {others}")
    if g.calls.get(name, 0) > 1 or g.calls.get(producer.target, 0) > 1:
        return NotFolded(name, "the module or its conv is called more than once")
    channels = prev.out_channels if hasattr(prev, "out_channels") else prev.out_features
    affine = per_channel_affine(module, channels, prev.weight.ndim - 2, prev.weight.dtype)
    if affine is None:
        reason = "it is not a per-channel affine map in eval mode (no running statistics?)"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            reason = "it has no running statistics (track_running_stats=False): it normalizes each batch"
        return refuse(reason)
    return FoldStep(name, producer.target, _module_kind(name, module, model), affine[0], affine[1])


def _plan_affine_fold(g: _Graph, node: fx.Node) -> tuple[FoldStep | None, NotFolded]:
    """A GroupNorm/LayerNorm: its affine folds into the conv/linear it feeds when that is exact. The norm itself
    always stays (its statistics depend on the input), so a NotFolded comes with every answer."""
    name, norm = node.target, g.modules[node.target]
    stats = "its statistics depend on the input at inference"
    if not getattr(norm, "elementwise_affine", getattr(norm, "affine", False)) or norm.weight is None:
        return None, NotFolded(name, f"{stats}; it has no affine to fold")
    users = list(node.users)
    if len(users) != 1:
        return None, NotFolded(name, f"{stats}; its output has {len(users)} users, so its affine stays")
    user = users[0]
    nxt = g.module_of(user)
    if not isinstance(nxt, _FOLD_INTO):
        # The kind of operation, not the node's name: alike normalizers then share one reason (and one line).
        if user.op == "call_module":
            what = type(g.modules[user.target]).__name__
        else:
            what = getattr(user.target, "__name__", str(user.target))
        return None, NotFolded(
            name, f"{stats}; a {what} stands between it and the next conv/linear, so its affine stays"
        )
    why = _affine_foldable_into(norm, nxt)
    if why is None and g.calls.get(user.target, 0) > 1:
        why = "the next layer is called more than once"
    if why:
        return None, NotFolded(name, f"{stats}; {why}")
    kind = "groupnorm-affine" if isinstance(norm, nn.GroupNorm) else "layernorm-affine"
    gamma = norm.weight.detach().double()
    beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(gamma)
    step = FoldStep(name, user.target, kind, gamma, beta)
    return step, NotFolded(name, f"{stats}; only its affine folds, into {user.target}")


def plan_folds(model: nn.Module) -> tuple[list[FoldStep], FoldReport]:
    """What would fold, without changing anything: the steps, and a report whose ``folded`` is still empty."""
    report = FoldReport()
    try:
        g = _Graph(model, trace(model))
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        report.skipped = f"the model cannot be traced by torch.fx ({type(exc).__name__}: {brief(first_line(exc))})"
        return [], report
    steps: list[FoldStep] = []
    # Normalizers after their layer first, then affines before theirs: a layer may take both.
    for node in g.module_nodes():
        planned = _plan_output_fold(g, node, model)
        if isinstance(planned, FoldStep):
            steps.append(planned)
        elif planned is not None:
            report.not_folded.append(planned)
    for node in g.module_nodes():
        if isinstance(g.modules[node.target], _NORMS):
            step, note = _plan_affine_fold(g, node)
            steps += [step] if step is not None else []
            report.not_folded.append(note)
    return steps, report


def apply_folds(model: nn.Module, steps: list[FoldStep], *, inplace: bool = False) -> nn.Module:
    """Carry out planned folds, on a copy of the modules involved unless ``inplace``; returns the model."""
    if not steps:
        return model
    if not inplace:
        model = copy_paths(model, {s.norm for s in steps} | {s.into for s in steps})
    for step in steps:
        layer = model.get_submodule(step.into)
        if FOLD_KINDS[step.kind] == "after":
            _fold_output_affine(layer, step.scale, step.shift)
        else:
            _fold_input_affine(layer, step.scale, step.shift)
        model = set_submodule(model, step.norm, _without_norm(model.get_submodule(step.norm), step.kind))
    return model


def fold_model(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold eval-mode per-channel affine normalizers into the conv/linear before them, then GroupNorm/LayerNorm
    affines into the conv/linear after them. Returns the model (a copy unless ``inplace``) and a report."""
    require_module(model, "fold_model")
    steps, report = plan_folds(model)
    model = apply_folds(model, steps, inplace=inplace)
    report.folded = [s.record() for s in steps]
    return model, report


def restore_fold_structure(model: nn.Module, folded: Iterable[Folded | Mapping[str, str]]) -> nn.Module:
    """Give a freshly built (and baked) model the module structure a folded checkpoint was saved with, so that
    its state dict loads: folded normalizers become Identity (or lose their affine), their layers gain a bias."""
    for entry in folded:
        norm_name, into, kind = (
            (entry["norm"], entry["into"], entry["kind"])
            if isinstance(entry, Mapping)
            else (entry.norm, entry.into, entry.kind)
        )
        layer = model.get_submodule(into)
        if layer.bias is None:
            transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
            out = layer.weight.shape[1] * layer.groups if transposed else layer.weight.shape[0]
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype), requires_grad=False)
        model = set_submodule(model, norm_name, _without_norm(model.get_submodule(norm_name), kind))
    return model
