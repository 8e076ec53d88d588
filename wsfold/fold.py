"""Fold inference-static normalizers into the baked convolutions and linear layers.

Runs after baking, never into a layer that still standardizes (folding into a WS layer's raw weight is undone by
its next standardization). Adjacency comes from a torch.fx trace, not module order; a conv whose output has other
users is not folded. A module is folded as a normalizer when probing proves it is a per-channel affine map in
eval mode (BatchNorm with running statistics, frozen BN, the batch half of Batch-Channel Normalization, ...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .bake import _set_submodule, _shallow_copy_tree

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass
class FoldReport:
    folded: list[dict[str, str]] = field(default_factory=list)
    not_folded: list[dict[str, str]] = field(default_factory=list)
    skipped: str | None = None  # why folding did not run at all

    def to_dict(self) -> dict[str, Any]:
        return {"folded": self.folded, "not_folded": self.not_folded, "fold_skipped": self.skipped}


class _LeafTracer(fx.Tracer):
    """Keeps every module without children opaque, so a custom normalizer is one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, qualname)


def _copy_module(module: nn.Module) -> nn.Module:
    """A new module object with its own parameter/buffer/child tables (the tensors themselves are shared)."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def trace(model: nn.Module) -> fx.Graph:
    return _LeafTracer().trace(model)


def per_channel_affine(
    module: nn.Module, channels: int, ndim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) such that module(x) == a_c * x + b_c for every input, found by probing; None if it is not such a map."""
    shape = (2, channels, *([5] * ndim))
    gen = torch.Generator().manual_seed(7)
    try:
        with torch.no_grad():
            b = module(torch.zeros(shape, dtype=dtype)).double()
            a = module(torch.ones(shape, dtype=dtype)).double() - b
            x = torch.randn(shape, generator=gen).to(dtype)
            y = module(x).double()
            x2 = 3.0 * torch.randn((3, channels, *([4] * ndim)), generator=gen).to(dtype)
            y2 = module(x2).double()
    except Exception:  # noqa: BLE001 - a module that cannot take this input is not a per-channel affine map
        return None
    if b.shape != shape or y2.shape != x2.shape:
        return None
    dims = [0, *range(2, b.ndim)]
    a_c, b_c = a.mean(dim=dims), b.mean(dim=dims)
    view = (1, channels, *([1] * ndim))
    tol = 64 * torch.finfo(dtype).eps
    scale = max(float(y.abs().max()), float(y2.abs().max()), 1e-12)
    for xx, yy in ((x, y), (x2, y2)):
        if float((a_c.view(view) * xx.double() + b_c.view(view) - yy).abs().max()) > tol * scale:
            return None
    return a_c, b_c


def _users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


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


def _norm_affine_foldable(norm: nn.Module, nxt: nn.Module) -> str | None:
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


def restore_fold_structure(model: nn.Module, folded: list[dict[str, str]]) -> nn.Module:
    """Give a freshly built (and baked) model the module structure a folded checkpoint was saved with, so that
    its state dict loads: folded normalizers become Identity (or lose their affine), their layers gain a bias."""
    for entry in folded:
        layer = model.get_submodule(entry["into"])
        if layer.bias is None:
            out = (
                layer.weight.shape[1] * layer.groups
                if isinstance(layer, nn.modules.conv._ConvTransposeNd)
                else layer.weight.shape[0]
            )
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype), requires_grad=False)
        norm = model.get_submodule(entry["norm"])
        if entry["kind"] == "groupnorm-affine":
            new = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)
        elif entry["kind"] == "layernorm-affine":
            new = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        else:
            new = nn.Identity()
        model = _set_submodule(model, entry["norm"], new)
    return model


def fold_model(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold eval-mode per-channel affine normalizers into the conv/linear before them, then GroupNorm/LayerNorm
    affines into the conv/linear after them. Returns the model (a copy unless ``inplace``) and a report."""
    report = FoldReport()
    try:
        graph = trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report.skipped = f"the model cannot be traced by torch.fx ({type(exc).__name__}: {first[:160]})"
        return model, report
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    plan_out: list[tuple[str, str, torch.Tensor, torch.Tensor, str]] = []
    plan_in: list[tuple[str, str, torch.Tensor, torch.Tensor, str]] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = node.target
        module = modules[name]
        if isinstance(module, _NORMS):
            continue
        bn_like = _is_bn_like(module)
        if isinstance(module, _FOLD_INTO) or not (
            bn_like
            or next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        ):
            continue
        producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        prev = modules.get(producer.target) if producer is not None and producer.op == "call_module" else None
        if not isinstance(prev, _FOLD_INTO):
            if bn_like:
                report.not_folded.append(
                    {"name": name, "reason": "its input is not the output of a conv or linear layer"}
                )
            continue
        if module.training:
            report.not_folded.append({"name": name, "reason": "it is in training mode (call model.eval())"})
            continue
        if len(_users(producer)) > 1:
            others = ", ".join(
                str(u.target if u.op == "call_module" else u.name) for u in _users(producer) if u is not node
            )
            report.not_folded.append({"name": name, "reason": f"the output of {producer.target} also feeds {others}"})
            continue
        if calls.get(name, 0) > 1 or calls.get(producer.target, 0) > 1:
            report.not_folded.append({"name": name, "reason": "the module or its conv is called more than once"})
            continue
        channels = prev.out_channels if hasattr(prev, "out_channels") else prev.out_features
        ndim = prev.weight.ndim - 2
        affine = per_channel_affine(module, channels, ndim, prev.weight.dtype)
        if affine is None:
            if bn_like:
                reason = "it is not a per-channel affine map in eval mode (no running statistics?)"
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
                    reason = "it has no running statistics (track_running_stats=False): it normalizes each batch"
                report.not_folded.append({"name": name, "reason": reason})
            continue
        plan_out.append((name, producer.target, affine[0], affine[1], _module_kind(name, module, model)))

    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _NORMS):
            continue
        name, norm = node.target, modules[node.target]
        stats = "its statistics depend on the input at inference"
        users = _users(node)
        if not getattr(norm, "elementwise_affine", getattr(norm, "affine", False)) or norm.weight is None:
            report.not_folded.append({"name": name, "reason": f"{stats}; it has no affine to fold"})
            continue
        if len(users) != 1:
            report.not_folded.append(
                {"name": name, "reason": f"{stats}; its output has {len(users)} users, so its affine stays"}
            )
            continue
        user = users[0]
        nxt = modules.get(user.target) if user.op == "call_module" else None
        if not isinstance(nxt, _FOLD_INTO):
            if user.op == "call_module":
                what = f"{user.target} ({type(modules[user.target]).__name__})"
            else:
                what = getattr(user.target, "__name__", str(user.target))
            report.not_folded.append(
                {
                    "name": name,
                    "reason": f"{stats}; {what} stands between it and the next conv/linear, so its affine stays",
                }
            )
            continue
        why = _norm_affine_foldable(norm, nxt)
        if why is None and calls.get(user.target, 0) > 1:
            why = "the next layer is called more than once"
        if why:
            report.not_folded.append({"name": name, "reason": f"{stats}; {why}"})
            continue
        kind = "groupnorm-affine" if isinstance(norm, nn.GroupNorm) else "layernorm-affine"
        plan_in.append(
            (
                name,
                user.target,
                norm.weight.detach().double(),
                norm.bias.detach().double() if norm.bias is not None else None,
                kind,
            )
        )
        report.not_folded.append({"name": name, "reason": f"{stats}; only its affine was folded into {user.target}"})

    if not plan_out and not plan_in:
        return model, report
    if not inplace:
        touched = (
            {p[0] for p in plan_out} | {p[1] for p in plan_out} | {p[0] for p in plan_in} | {p[1] for p in plan_in}
        )
        model = _shallow_copy_tree(model, touched)
        for target in touched:
            model = _set_submodule(model, target, _copy_module(model.get_submodule(target)))
    for norm_name, into, a, b, kind in plan_out:
        layer = model.get_submodule(into)
        _fold_output_affine(layer, a, b)
        model = _set_submodule(model, norm_name, nn.Identity())
        report.folded.append({"norm": norm_name, "into": into, "kind": kind})
    for norm_name, into, gamma, beta, kind in plan_in:
        layer = model.get_submodule(into)
        _fold_input_affine(layer, gamma, beta if beta is not None else torch.zeros_like(gamma))
        norm = model.get_submodule(norm_name)
        if isinstance(norm, nn.GroupNorm):
            plain = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)
        else:
            plain = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        model = _set_submodule(model, norm_name, plain.to(gamma.device))
        report.folded.append({"norm": norm_name, "into": into, "kind": kind})
    return model, report
