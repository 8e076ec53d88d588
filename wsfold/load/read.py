"""Read checkpoint files without running their code: the raw object, its state dict, a baked file's checked manifest."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import (
    ManifestError,
    OptionError,
    PickleRefusedError,
    SourceError,
    first_line,
)

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


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (the manifest's record of a baked tensor)."""
    flat = t.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """tensor_digest of each tensor, on two threads (hashlib lets go of the GIL while it hashes): sha256 runs at
    about 0.6 GB/s on one core here, so a 1.5 GB baked model's digests took 2.5 s on one thread."""
    from ..io.parallel import each_in_threads

    keys = sorted(tensors, key=lambda k: -tensors[k].numel() * tensors[k].element_size())
    return dict(zip(keys, each_in_threads(lambda k: tensor_digest(tensors[k]), keys, name="wsfold-digest")))


def read_manifest(metadata: Mapping[str, str] | None, sd: Mapping[str, torch.Tensor], path: Path) -> dict | None:
    """The manifest of a wsfold-baked .safetensors file, checked: well-formed, and every baked tensor's digest
    matching the tensor in the file (a manifest is a claim that the weights are baked; it is not believed
    unchecked). None for a file without one."""
    from ..bake.fold import FOLD_KINDS

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
