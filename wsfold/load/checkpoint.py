"""Load SOURCE: a state dict (.pt/.pth/.bin through torch.load(weights_only=True), or .safetensors) built into
the --arch model, or a whole pickled module when the user allows pickle."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bake.modeltree import set_eval
from ..errors import (
    ArchitectureError,
    PickleRefusedError,
    SourceError,
    first_line,
)
from .build import LoadedModel, _check_module, build_and_load, build_arch
from .read import (
    BAKED_MARKER,
    STATE_KEYS,
    _is_state_dict,
    _require_content,
    check_tensors,
    find_state_dict,
    read_checkpoint,
    read_manifest,
)


def load_model(
    source: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    state_key: str | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load SOURCE into an eval-mode nn.Module. Never loads pickled code unless ``allow_pickle``."""
    if not isinstance(source, (str, Path)):
        raise TypeError(f"load_model expects a checkpoint path, not {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        from .hub import load_directory

        return load_directory(path, arch=arch, arch_kwargs=arch_kwargs)
    if path.suffix == ".pt2":
        program = load_baked(path, allow_pickle=allow_pickle)
        return LoadedModel(program, path, "exported")
    obj, metadata = read_checkpoint(path, allow_pickle=allow_pickle)
    if isinstance(obj, nn.Module):
        _check_module(obj, path)
        set_eval(obj)
        return LoadedModel(obj, path, "module")
    if isinstance(obj, Mapping) and not state_key:
        for key in STATE_KEYS:
            if isinstance(obj.get(key), nn.Module):
                _check_module(obj[key], path)
                set_eval(obj[key])
                return LoadedModel(obj[key], path, "module", state_key=key)
    if isinstance(obj, Mapping):
        check_tensors(obj, path)
    sd, found_key = find_state_dict(obj, state_key, path)
    check_tensors(sd, path)
    notes = []
    if state_key is None and found_key is not None and isinstance(obj, Mapping):
        others = [k for k in STATE_KEYS if k != found_key and k in obj and _is_state_dict(obj[k])]
        if others:
            notes.append(
                f"weights taken from checkpoint key {found_key!r}; it also holds {', '.join(map(repr, others))} "
                f"(choose with --state-key {others[0]})"
            )
    if arch is None:
        raise ArchitectureError(
            f"{path} holds a state dict ({len(sd)} tensors) and wsfold needs the architecture to run it.",
            "pass --arch package.module:callable or --arch path/to/file.py:callable (with --arch-kwargs JSON).",
        )
    manifest = read_manifest(metadata, sd, path)
    if manifest is not None:
        sd.pop(BAKED_MARKER, None)
    del obj
    model = build_and_load(lambda: build_arch(arch, arch_kwargs), arch, sd, manifest)
    del sd
    set_eval(model)
    if manifest is not None:
        notes.append(
            f"{path.name} was written by wsfold bake ({len(manifest.get('layers', []))} layer(s) baked, "
            f"{len(manifest.get('folded', []))} normalizer(s) folded; every baked tensor matches its recorded "
            "digest): its layers are plain already, so none is listed as weight-standardized"
        )
    return LoadedModel(model, path, "state_dict", state_key=found_key, manifest=manifest, notes=notes)


class _Kept(logging.Handler):
    """Keeps the first line of each exception a logger records."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(first_line(record.exc_info[1]))


@contextlib.contextmanager
def _logged_errors(name: str):
    """What the named logger records while the block runs is kept (the first line of each exception it logs),
    not printed: torch.export logs a whole traceback, then raises an error that says to look above it."""
    logger = logging.getLogger(name)
    kept = _Kept()
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [kept], False  # torch gives the logger a handler of its own
    try:
        yield kept.errors
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _program_input_shapes(program) -> list[tuple[int, ...]] | None:
    """The input shapes a torch.export program was captured with, batch 1 where the batch is dynamic; None when
    the program does not say (no example inputs, inputs that are not tensors)."""
    example = getattr(program, "example_inputs", None)
    try:
        args, kwargs = example
        names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        shapes = []
        for name, arg in zip(names, args):
            if kwargs or not isinstance(arg, torch.Tensor):
                return None
            traced = placeholders[name].meta["val"].shape
            dynamic_batch = len(traced) > 0 and not isinstance(traced[0], int)
            shapes.append((1, *arg.shape[1:]) if dynamic_batch else tuple(arg.shape))
    except Exception:  # noqa: BLE001 - a program without the usual records: the user gives --input-shape
        return None
    return shapes if len(shapes) == len(args) else None


def load_baked(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """The one way back to a model wsfold baked, in eval mode.

    - ``.safetensors`` (bake's default): rebuilt from ``arch`` in its baked structure and filled, after the
      manifest is checked against every baked tensor; a file without a wsfold manifest is refused.
    - ``.pt2``: ``torch.export.load(path).module()``; torch deserializes part of it with pickle, so this needs
      ``allow_pickle`` (in a Python of your own, torch alone loads it: no wsfold, no architecture code).
    - ``.pt``: the pickled module (``allow_pickle``; the architecture's classes must be importable)."""
    path = Path(path)
    if path.suffix == ".pt2":
        if not allow_pickle:
            raise PickleRefusedError(
                f"{path}: torch.export.load unpickles parts of a .pt2 file, which can run code.",
                "if you trust this file, pass --allow-pickle (allow_pickle=True).",
            )
        if not path.is_file():
            raise SourceError(f"{path}: no such file.", "check the path.")
        _require_content(path)
        logged: list[str] = []
        try:
            with _logged_errors("torch.export") as logged:
                program = torch.export.load(str(path))
            module = program.module()
        except Exception as exc:  # noqa: BLE001 - any unreadable archive
            why = "; ".join([*logged, first_line(exc)]) if "warnings above" not in str(exc) else "; ".join(logged)
            raise SourceError(
                f"{path} is not a readable torch.export archive ({why or first_line(exc)}).", "re-bake it."
            ) from None
        shapes = _program_input_shapes(program)
        if shapes:
            module.wsfold_input_shapes = shapes  # what export takes when no --input-shape is given
        return module
    loaded = load_model(path, arch=arch, arch_kwargs=arch_kwargs, allow_pickle=allow_pickle)
    if path.suffix == ".safetensors" and loaded.manifest is None:
        raise SourceError(
            f"{path} has no wsfold manifest: it is not a file wsfold baked.",
            "use wsfold.load_model for an original checkpoint, or bake it first.",
        )
    return loaded.model
