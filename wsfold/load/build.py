"""Build the architecture (--arch, --arch-kwargs) and fill it strictly from a state dict."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..bake.modeltree import set_eval
from ..errors import (
    ArchitectureError,
    ManifestError,
    OptionError,
    SourceError,
    UserCodeError,
    first_line,
)
from .read import _check_one_dtype, check_tensors


@dataclass
class LoadedModel:
    """A model ready for detection: in eval mode, with the checkpoint's own tensors and dtypes."""

    model: nn.Module
    source: Path
    kind: str  # "state_dict" | "module" | "directory" | "exported" (a torch.export program, already baked)
    state_key: str | None = None
    manifest: dict[str, Any] | None = None  # present when SOURCE is a wsfold-baked safetensors file
    notes: list[str] = field(default_factory=list)  # what a user should know about how SOURCE was read


def fit_prefixes(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``sd`` with a wrapper's prefix stripped (``module.`` from DataParallel/DDP, ``_orig_mod.`` from
    torch.compile) only when that makes it fit the architecture's keys better."""

    def misfit(keys) -> int:
        return len(set(keys) ^ expected)

    best, best_misfit = sd, misfit(sd)
    candidate = sd
    while best_misfit and candidate:
        prefix = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(p) for k in candidate)), None)
        if prefix is None:
            break
        candidate = {k[len(prefix) :]: v for k, v in candidate.items()}
        if misfit(candidate) < best_misfit:
            best, best_misfit = candidate, misfit(candidate)
    return best


def resolve_arch(spec: str) -> Callable[..., Any]:
    """``package.module:callable`` or ``path/to/file.py:callable``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ArchitectureError(
            f"--arch {spec!r} is not of the form package.module:callable or path/to/file.py:callable.",
            "add ':callable'.",
        )
    if target.endswith(".py"):
        module = _import_file(Path(target), spec)
    else:
        module = _import(target, spec)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ArchitectureError(
                f"--arch {spec!r}: {target} has no attribute {attr!r}.", "check the name after ':'."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArchitectureError(
            f"--arch {spec!r} is not callable.", "point at a class or a function returning an nn.Module."
        )
    return obj


def _import(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ArchitectureError(
            f"--arch {spec!r}: cannot import {name} ({exc}).", "install the package or pass path/to/file.py:callable."
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while being imported
        raise UserCodeError(
            f"--arch {spec!r}: importing {name} raised {type(exc).__name__}: {first_line(exc)}.",
            "fix the module (it runs as the architecture's code).",
        ) from None


def _import_file(file: Path, spec: str):
    """Import the arch file itself (not whatever its stem finds first on sys.path). Its folder goes at the end of
    sys.path, so that the file's own sibling imports work but a sibling never shadows a package wsfold imports
    (a stray onnx.py beside the file); it is registered under its stem, so a pickled baked model finds its
    classes again, unless that name belongs to another module."""
    if not file.exists():
        raise ArchitectureError(f"--arch file {file} does not exist.", "check the path before ':'.")
    if not file.is_file():
        raise ArchitectureError(
            f"--arch file {file} is not a regular file (a folder, a pipe or a device?).",
            "pass the .py file that defines the architecture.",
        )
    resolved = file.resolve()
    name = file.stem
    existing = sys.modules.get(name)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == resolved:
        return existing
    try:
        taken = existing is not None or importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        taken = True
    if taken:
        name = f"wsfold_arch_{name}"
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    spec_obj = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[name] = module
    try:
        spec_obj.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if not isinstance(exc, Exception):
            raise
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
        raise UserCodeError(
            f"--arch file {file} could not be imported: {type(exc).__name__}{where}: {first_line(exc)}.",
            "fix the file (it runs as the architecture's code).",
        ) from None
    return module


def _has_meta_tensors(model: nn.Module) -> bool:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            return True
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and v.is_meta:
                return True
    return False


_RANDOM_FILLS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_")
)
_RANDOM_FACTORIES = frozenset((torch.randn, torch.rand))


class _NoRandomFill(TorchFunctionMode):
    """While an architecture is built on the meta device, random initialization is skipped: a meta tensor holds no
    values to fill (the checkpoint's replace them), and on meta torch runs these fills through Python reference
    code that imports torch._dynamo on first use, ~2 s measured here for one ``nn.init.kaiming_normal_`` (timm's
    ResNetV2 calls it for every conv). Anything else runs as the constructor asks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes the tensor by keyword
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        elif func in _RANDOM_FILLS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        elif func in _RANDOM_FACTORIES and kwargs.get("out") is None:
            # The device in force (the meta context, unless the constructor set another) decides, as it would
            # for the random tensor; only a meta one is left empty.
            empty = torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
            if empty.is_meta:
                return empty
        return func(*args, **kwargs)


def build_and_load(
    build: Callable[[], nn.Module], spec: str, sd: Mapping[str, torch.Tensor], manifest: dict | None
) -> nn.Module:
    """Build the architecture (``build``, named ``spec`` in messages) on the meta device (no memory for a random
    init that the checkpoint replaces) and assign the checkpoint's tensors; if anything is left on meta (a
    non-persistent buffer, a tensor attribute, a constructor that needs real tensors), build it on the CPU
    instead."""
    # A wsfold-baked state dict needs real layers: baking runs them to rebuild the baked structure.
    for device in ("meta", "cpu") if manifest is None else ("cpu",):
        try:
            with torch.device(device), _NoRandomFill() if device == "meta" else contextlib.nullcontext():
                model = build()
        except UserCodeError:
            if device == "meta":
                continue  # some constructors cannot run on meta; the CPU build is the fallback
            raise
        if manifest is not None:
            # A wsfold-baked state dict: rebuild the baked structure from the architecture, then fill it.
            from ..bake.baker import bake_model
            from ..bake.fold import restore_fold_structure

            set_eval(model)
            model, report = bake_model(model, inplace=True, allow_nonfinite=True)
            _require_manifest_layers(manifest, [b.layer.name for b in report.baked], spec)
            try:
                model = restore_fold_structure(model, manifest.get("folded", []))
            except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise ArchitectureError(
                    f"the baked checkpoint does not fit --arch {spec} (its folded layers are not there: "
                    f"{first_line(exc)}).",
                    "pass the architecture the checkpoint was baked from.",
                ) from None
        fitted = fit_prefixes(dict(sd), set(model.state_dict()))
        if device == "cpu":
            load_strict(model, fitted, spec)
            return model
        try:
            load_strict(model, fitted, spec)
        except UserCodeError:
            continue  # a load hook that computes on its buffers cannot run on meta: the CPU build decides
        if not _has_meta_tensors(model):
            return model
    raise AssertionError("unreachable")


def _require_manifest_layers(manifest: dict, baked: list[str], spec: str) -> None:
    """The layers a manifest says were baked are those the architecture weight-standardizes: a manifest that
    lists fewer (a layer whose stored weight is raw would be loaded as a plain conv) or others is refused."""
    listed = [entry.get("name") for entry in manifest["layers"]]
    missing = [name for name in baked if name not in listed]
    extra = [str(name) for name in listed if name not in baked]
    if not missing and not extra:
        return
    shown = ", ".join(repr(n) for n in (missing or extra)[:3]) + (" ..." if len(missing or extra) > 3 else "")
    if missing:
        what = (
            f"the architecture weight-standardizes {len(baked)} layer(s) and the file's manifest lists {len(listed)} "
            f"as baked: {shown} missing, so their stored weights may be raw"
        )
    else:
        what = f"its manifest lists layer(s) {shown} as baked, which the architecture does not weight-standardize"
    raise ManifestError(
        f"the baked checkpoint does not fit --arch {spec} ({what}).",
        "bake the original checkpoint with `wsfold bake`, or pass the architecture it was baked from.",
    )


def build_arch(spec: str, kwargs: dict[str, Any] | str | None = None) -> nn.Module:
    """Call the --arch callable with --arch-kwargs and check that it returns an nn.Module."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except RecursionError:
            raise OptionError(
                "--arch-kwargs is nested too deeply to read.", "pass a flat object such as '{\"num_classes\": 10}'."
            ) from None
        except ValueError as exc:  # JSONDecodeError, and numbers past Python's digit limit
            raise OptionError(
                f"--arch-kwargs is not valid JSON ({first_line(exc)[:200]}).",
                "pass an object such as '{\"num_classes\": 10}'.",
            ) from None
        if not isinstance(kwargs, dict):
            raise OptionError("--arch-kwargs must be a JSON object.", "pass an object such as '{\"num_classes\": 10}'.")
    fn = resolve_arch(spec)
    try:
        model = fn(**(kwargs or {}))
    except TypeError as exc:
        raise ArchitectureError(
            f"--arch {spec!r} could not be called with {_short(kwargs or {})} ({first_line(exc)}).",
            "fix --arch-kwargs.",
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's callable raised
        raise UserCodeError(
            f"--arch {spec!r}: {getattr(fn, '__qualname__', spec)}() raised {type(exc).__name__}: {first_line(exc)}.",
            "fix the architecture code or --arch-kwargs.",
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"--arch {spec!r} returned a {type(model).__name__}, not an nn.Module.",
            "point at a callable that builds the model.",
        )
    return model


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_misfit(missing: list[str], unexpected: list[str], shapes: list[str], spec: str) -> ArchitectureError:
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape clash" + ("es" if len(shapes) > 1 else "") + " (checkpoint vs model)", shapes),
    ):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    return ArchitectureError(
        f"the checkpoint does not fit --arch {spec}: " + "; ".join(parts) + ".",
        "check --arch and --arch-kwargs (or --state-key) against how the checkpoint was trained.",
    )


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], spec: str) -> None:
    """Load with the checkpoint's own tensors and dtypes (assign), strictly, but through the model's load hooks:
    a layer that fills a missing key itself (mmcv ConvAWS2d's gamma/beta) is not a mismatch."""
    expected = model.state_dict()
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if shapes:
        raise _describe_misfit([], [], shapes, spec)
    for k, v in expected.items():
        if k in sd and v.is_floating_point() and not sd[k].is_floating_point():
            raise SourceError(
                f"checkpoint tensor {k} is {str(sd[k].dtype).removeprefix('torch.')} where --arch {spec} expects "
                f"floating point.",
                "the file holds other weights than the architecture's (quantized, or written wrongly).",
            )
    params = {k for k, _ in model.named_parameters()}
    _check_one_dtype({k: v for k, v in sd.items() if k in params})
    try:
        result = model.load_state_dict(sd, strict=False, assign=True)
    except Exception as exc:  # noqa: BLE001 - the model's own load hooks run here
        raise UserCodeError(
            f"loading the checkpoint into --arch {spec} raised {type(exc).__name__}: {first_line(exc)}.",
            "check --arch and --arch-kwargs against how the checkpoint was trained.",
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise _describe_misfit(list(result.missing_keys), list(result.unexpected_keys), [], spec)


def _check_module(model: nn.Module, path: Path) -> None:
    check_tensors(dict(model.named_parameters()), path)
    _check_one_dtype(dict(model.named_parameters()))
