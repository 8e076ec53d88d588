"""Load SOURCE: a state dict (.pt/.pth/.bin through torch.load(weights_only=True), or .safetensors) built into
the --arch model, or a whole pickled module when the user allows pickle."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import (
    ArchitectureError,
    ManifestError,
    OptionError,
    PickleRefusedError,
    SourceError,
    UserCodeError,
    first_line,
)
from .modeltree import set_eval

STATE_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "ema",
    "model_ema",
    "ema_state_dict",
    "net",
    "network",
    "params",
    "weights",
)
MANIFEST_KEY = "wsfold"
BAKED_MARKER = "wsfold_baked"  # a tensor key in every baked .safetensors (see save.py)


@dataclass
class LoadedModel:
    """A model ready for detection: in eval mode, with the checkpoint's own tensors and dtypes."""

    model: nn.Module
    source: Path
    kind: str  # "state_dict" | "module" | "directory" | "exported" (a torch.export program, already baked)
    state_key: str | None = None
    manifest: dict[str, Any] | None = None  # present when SOURCE is a wsfold-baked safetensors file
    notes: list[str] = field(default_factory=list)  # what a user should know about how SOURCE was read


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require_content(path: Path) -> None:
    if path.stat().st_size == 0:
        raise SourceError(
            f"{path} is empty (0 bytes).", "the download or copy probably failed; fetch the checkpoint again."
        )


def read_checkpoint(path: Path, *, allow_pickle: bool = False) -> tuple[Any, dict[str, str] | None]:
    """The raw object stored at ``path`` (and safetensors metadata), refusing code-bearing pickles unless allowed."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file.", "check the path to SOURCE.")
    if path.is_dir():
        raise SourceError(f"{path} is a directory, not a checkpoint file.", "pass the checkpoint file itself.")
    if not path.is_file():
        raise SourceError(
            f"{path} is not a regular file (a pipe or a device?); wsfold reads a checkpoint more than once.",
            "save the checkpoint to a file and pass that.",
        )
    _require_content(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    # torch.save writes a zip archive (PK) or, in the legacy format, a pickle (protocol byte 0x80).
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise SourceError(
            f"{path} is not a PyTorch checkpoint (it starts with {head!r}).",
            "pass a .pt/.pth/.bin file written by torch.save, or a .safetensors file.",
        )
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise SourceError(
            f"{path} is truncated or corrupt (its zip directory is unreadable).", "fetch the checkpoint again."
        )
    try:
        # mmap: nothing is read until used, and baking hands each source weight's pages back (memory.py).
        obj = _torch_load(path, weights_only=True, mmap=head.startswith(b"PK"))
        return obj, None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise SourceError(
                f"{path} is not a readable PyTorch checkpoint ({first_line(exc)}).", "fetch the checkpoint again."
            ) from None
        if not allow_pickle:
            raise PickleRefusedError(
                f"{path} holds code-bearing pickle data (e.g. a whole nn.Module) that can run code when loaded.",
                "if you trust this file, pass --allow-pickle; otherwise save a state dict and use --arch.",
            ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise SourceError(
            f"{path} is truncated or corrupt ({first_line(exc)}).", "fetch the checkpoint again."
        ) from None
    try:
        return _torch_load(path, weights_only=False, mmap=head.startswith(b"PK")), None
    except Exception as exc:  # noqa: BLE001 - unpickling arbitrary user objects can raise anything
        raise SourceError(
            f"{path} could not be unpickled ({type(exc).__name__}: {first_line(exc)}).",
            "make the classes it was saved with importable (PYTHONPATH), or save a state dict and use --arch.",
        ) from None


def _torch_load(path: Path, *, weights_only: bool, mmap: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols and the like: not the user's concern
        return _torch_load_quietly(path, weights_only=weights_only, mmap=mmap)


def _torch_load_quietly(path: Path, *, weights_only: bool, mmap: bool) -> Any:
    """torch.load on CPU, memory-mapped only as a private (copy-on-write) mapping, so that nothing done to the
    loaded tensors can reach the file; a process that set MAP_SHARED as torch's default gets a plain read."""
    import mmap as _mmap

    private = sys.platform != "win32" and torch.serialization.get_default_mmap_options() == _mmap.MAP_PRIVATE
    if mmap and private:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except (RuntimeError, ValueError, OSError):
            pass  # a file torch cannot map (or a damaged one): a plain read decides
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The file's tensors and metadata. safetensors checks the file; the tensors then view a private mapping of
    it (like torch.load's mmap: nothing is read until used, and a baked layer's source pages can be handed back),
    or, where the layout does not allow a view, are copies read by safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            keys = list(fh.keys())
            tensors = _mapped_safetensors(path, keys)
            if tensors is None:
                tensors = {k: fh.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SourceError(
            f"{path} is not a valid safetensors file ({first_line(exc)}).", "fetch the checkpoint again."
        ) from None
    return tensors, metadata


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _mapped_safetensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """Each tensor of a (valid) safetensors file as a view of one private mapping of it, each on a storage of its
    own bytes (so that saving one tensor does not write the whole file); None when any tensor cannot be viewed in
    place (a dtype outside this table, an offset not aligned to its element size, a big-endian machine)."""
    if sys.byteorder != "little":
        return None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    base = 8 + length
    layout = {}
    for key in keys:
        entry = header.get(key)
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if dtype is None:
            return None
        begin, end = (base + offset for offset in entry["data_offsets"])
        shape = [int(d) for d in entry["shape"]]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if begin % itemsize or end - begin != math.prod(shape) * itemsize or end > size:
            return None
        layout[key] = (dtype, shape, begin, end)
    try:
        whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except (RuntimeError, OSError):
        return None  # a file system that cannot map it: safetensors reads it
    return {
        key: torch.empty(0, dtype=dtype).set_(whole[begin:end], 0, shape)
        for key, (dtype, shape, begin, end) in layout.items()
    }


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(obj: Any, state_key: str | None, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a checkpoint object (a training checkpoint stores it under a key).

    ``state_key`` walks nested dicts first, then key prefixes: ``ema.ema_model.model`` takes the dict at ``ema``
    and keeps its keys under ``ema_model.model.``, with that prefix stripped."""
    if state_key is not None:
        if not state_key or any(not part for part in state_key.split(".")):
            raise OptionError(f"--state-key {state_key!r} has an empty part.", "write it like ema.ema_model.model.")
        return _walk_state_key(obj, state_key, path), state_key
    if _is_state_dict(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key]), key
        keys = ", ".join(map(str, list(obj)[:10]))
        raise SourceError(
            f"{path} holds a dict without a state dict under any usual key (keys: {keys}).",
            "name the key that holds the weights with --state-key KEY (dotted for nesting and prefixes).",
        )
    raise SourceError(
        f"{path} holds a {type(obj).__name__}, not a state dict or an nn.Module.",
        "save the model's state_dict() with torch.save.",
    )


def _walk_state_key(obj: Any, state_key: str, path: Path) -> dict[str, torch.Tensor]:
    node, parts = obj, state_key.split(".")
    while parts and isinstance(node, Mapping) and isinstance(node.get(parts[0]), Mapping):
        node = node[parts.pop(0)]
    if not isinstance(node, Mapping):
        raise OptionError(f"--state-key {state_key!r} does not lead to a dict in {path}.", "pick a key that does.")
    if parts:
        prefix = ".".join(parts) + "."
        sub = {k[len(prefix) :]: v for k, v in node.items() if isinstance(k, str) and k.startswith(prefix)}
        if not sub:
            heads = sorted({str(k).split(".")[0] for k in node})[:10]
            raise OptionError(
                f"--state-key {state_key!r}: no key of {path} at that place starts with {prefix!r} "
                f"(they start with: {', '.join(heads) or 'nothing'}).",
                "pick one of the names listed.",
            )
        node = sub
    if not _is_state_dict(node):
        raise OptionError(
            f"--state-key {state_key!r} in {path} does not hold a state dict of tensors.",
            "pick the key that holds the model weights.",
        )
    return dict(node)


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


def check_tensors(tensors: Mapping[Any, Any], path: Path) -> None:
    """What no architecture can run: non-string keys, sparse or otherwise non-dense tensors."""
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise SourceError(
                f"{path} has a state-dict key that is not a string ({key!r}, a {type(key).__name__}).",
                "save the model's state_dict() as it is; its keys are parameter names.",
            )
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise SourceError(
                f"{path}: tensor {key} is on the {value.device.type} device, which holds no data to load.",
                "save the checkpoint with its tensors on the CPU.",
            )
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            raise SourceError(
                f"{path}: tensor {key} is stored as {str(value.layout).removeprefix('torch.')}, not dense.",
                "save dense tensors (tensor.to_dense()).",
            )


def _check_one_dtype(params: Mapping[str, torch.Tensor]) -> None:
    """Parameters of several floating dtypes cannot run together (a conv refuses a float16 bias for a float32
    input): name two that differ."""
    first: dict[torch.dtype, str] = {}
    for key, t in params.items():
        if t.is_floating_point():
            first.setdefault(t.dtype, key)
    if len(first) > 1:
        (da, ka), (db, kb) = list(first.items())[:2]
        raise SourceError(
            f"the checkpoint mixes floating dtypes: {ka} is {str(da).removeprefix('torch.')}, "
            f"{kb} is {str(db).removeprefix('torch.')}.",
            "cast the whole checkpoint to one dtype (model.half() or model.float()) before saving it.",
        )


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
    if not file.is_file():
        raise ArchitectureError(f"--arch file {file} does not exist.", "check the path before ':'.")
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
            from .bake import bake_model
            from .fold import restore_fold_structure

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


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (the manifest's record of a baked tensor)."""
    flat = t.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """tensor_digest of each tensor, on two threads (hashlib lets go of the GIL while it hashes): sha256 runs at
    about 0.6 GB/s on one core here, so a 1.5 GB baked model's digests took 2.5 s on one thread."""
    from .parallel import each_in_threads

    keys = sorted(tensors, key=lambda k: -tensors[k].numel() * tensors[k].element_size())
    return dict(zip(keys, each_in_threads(lambda k: tensor_digest(tensors[k]), keys, name="wsfold-digest")))


def read_manifest(metadata: Mapping[str, str] | None, sd: Mapping[str, torch.Tensor], path: Path) -> dict | None:
    """The manifest of a wsfold-baked .safetensors file, checked: well-formed, and every baked tensor's digest
    matching the tensor in the file (a manifest is a claim that the weights are baked; it is not believed
    unchecked). None for a file without one."""
    from .fold import FOLD_KINDS

    if not metadata or MANIFEST_KEY not in metadata:
        return None

    def malformed(why: str) -> ManifestError:
        return ManifestError(
            f"{path}: its wsfold manifest is malformed ({why}).",
            "re-bake the original checkpoint with `wsfold bake`, or remove the 'wsfold' metadata.",
        )

    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise malformed(f"not JSON: {first_line(exc)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise malformed("not an object with a list of layers")
    if not isinstance(manifest.get("folded", []), list):
        raise malformed("its 'folded' is not a list")
    for entry in manifest.get("folded", []):
        if not (
            isinstance(entry, dict)
            and set(entry) == {"norm", "into", "kind"}
            and all(isinstance(v, str) for v in entry.values())
            and entry["kind"] in FOLD_KINDS
        ):
            raise malformed(f"a folded entry {str(entry)[:80]!r} is not one wsfold writes")
    for entry in manifest["layers"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("digests"), dict):
            raise malformed("a layer without tensor digests (written by an older wsfold?)")
        for key in entry["digests"]:
            if key not in sd:
                raise ManifestError(
                    f"{path}: its manifest names tensor {key}, which the file does not hold.",
                    "re-bake the original checkpoint with `wsfold bake`.",
                )
    found = tensor_digests({key: sd[key] for entry in manifest["layers"] for key in entry["digests"]})
    for entry in manifest["layers"]:
        for key, digest in entry["digests"].items():
            if found[key] != digest:
                raise ManifestError(
                    f"{path}: tensor {key} does not match the digest its wsfold manifest records; the file's weights "
                    "are not the ones wsfold baked.",
                    "re-bake the original checkpoint with `wsfold bake` (a manifest is never trusted unchecked).",
                )
    return manifest


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
