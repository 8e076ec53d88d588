"""Module-tree helpers that let core functions work on a model without changing the one they were handed:
copy-on-write paths for replacing submodules, structural copies, dtype-converted copies and temporary modes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def require_module(obj: object, caller: str) -> nn.Module:
    """``obj`` if it is an nn.Module; a TypeError naming ``caller`` otherwise (a programming error, not bad input)."""
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, not {type(obj).__name__}")
    return obj


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module object is reachable (a module used at two places has two)."""
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return paths


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` (the root when ``name`` is empty); returns the root."""
    if name == "":
        return new
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
    return model


def copy_module(module: nn.Module) -> nn.Module:
    """A new module object with its own parameter/buffer/child tables (the tensors and children are shared) and
    its own hook tables (holding the hooks the module has): a hook registered on the copy never reaches the
    original."""
    # Not copy.copy: a parametrized module refuses __getstate__ (torch.nn.utils.parametrize).
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    for key, value in module.__dict__.items():
        if "hook" in key and isinstance(value, dict):
            clone.__dict__[key] = type(value)(value)
    return clone


def copy_path(model: nn.Module, name: str, copied: dict[str, nn.Module]) -> nn.Module:
    """Copy (once, recorded in ``copied``) the root and every module above ``name``, so that setting ``name``
    does not reach the original tree; returns the copied root. Tensors and other modules stay shared."""
    if "" not in copied:
        copied[""] = copy_module(model)
    parts = name.split(".")
    for depth in range(1, len(parts)):
        path = ".".join(parts[:depth])
        if path in copied:
            continue
        parent = copied[".".join(parts[: depth - 1])]
        clone = copy_module(parent._modules[parts[depth - 1]])
        parent._modules[parts[depth - 1]] = clone
        copied[path] = clone
    return copied[""]


def copy_paths(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """The tree copied on the paths to every module in ``names``, those modules copied too (see copy_path):
    each of them can then be replaced or changed without reaching ``model``. Returns the copied root."""
    names = sorted(set(names))
    if not names:
        return model
    copied: dict[str, nn.Module] = {}
    for name in names:
        copy_path(model, name, copied)
    root = copied[""]
    for name in names:
        if name:
            set_submodule(root, name, copy_module(root.get_submodule(name)))
    return root


def structural_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every module object copied (tables too), tensors shared, or converted to ``dtype`` when given (floating
    point ones; a tensor shared by two modules stays shared). Changing the copy's modes, dtype or submodules
    never reaches ``model``; unlike deepcopy it costs no tensor memory when no dtype is given."""
    converted: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or dtype is None or not t.is_floating_point() or t.dtype == dtype:
            return t
        if id(t) not in converted:
            new = t.detach().to(dtype)
            converted[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return converted[id(t)]

    clones: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in clones:
            return clones[id(m)]
        c = copy_module(m)
        clones[id(m)] = c
        c._parameters = {k: convert(v) for k, v in m._parameters.items()}
        c._buffers = {k: convert(v) for k, v in m._buffers.items()}
        c._modules = {k: (clone(v) if v is not None else None) for k, v in m._modules.items()}
        return c

    return clone(model)


def set_eval(model: nn.Module) -> nn.Module:
    """Every module's training flag off, set directly: a torch.export program's module refuses .eval() itself."""
    for m in model.modules():
        m.training = False
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    set_eval(model)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def widened_on_call(model: nn.Module, dtype: torch.dtype = torch.float64) -> Iterator[nn.Module]:
    """Run ``model`` in ``dtype`` without a ``dtype`` copy of all its weights: while the block lasts, each
    module's own floating parameters and buffers are widened when its forward starts and put back when it ends,
    so at most the weights of the modules being run (a layer and its parents) exist widened at a time.

    ``model`` must be a private copy (see structural_copy): its modules' tensor slots are swapped during calls.
    A model whose code reads another module's weight without calling that module sees the narrow tensor and
    fails on the dtype mismatch; callers then widen a full copy instead."""
    saved: dict[int, list[dict[str, tuple[bool, torch.Tensor]]]] = {}

    def before(module: nn.Module, args: object) -> None:
        own: dict[str, tuple[bool, torch.Tensor]] = {}
        for slots, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(slots.items()):
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    own[name] = (is_param, t)
                    wide = t.detach().to(dtype)
                    slots[name] = nn.Parameter(wide, requires_grad=False) if is_param else wide
        saved.setdefault(id(module), []).append(own)

    def after(module: nn.Module, args: object, output: object) -> None:
        stack = saved.get(id(module))
        if not stack:
            return
        for name, (is_param, t) in stack.pop().items():
            (module._parameters if is_param else module._buffers)[name] = t

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():  # put back whatever an interrupted forward left widened
            while saved.get(id(module)):
                for name, (is_param, t) in saved[id(module)].pop().items():
                    (module._parameters if is_param else module._buffers)[name] = t


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` for the block: what a model builds in forward without naming a
    dtype (a sinusoidal timestep embedding's ``torch.arange(n) * c``) then matches its weights in a float64
    reference. float16/bfloat16 leave the default as it is (torch computes factories at those poorly)."""
    if dtype not in (torch.float32, torch.float64):
        yield
        return
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)
