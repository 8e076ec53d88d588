"""Model directories as the hubs write them, read offline: transformers' ``save_pretrained`` (config.json with
``architectures``) and timm's ``save_for_hf`` (config.json with ``architecture``), with their weights in
model.safetensors (sharded or not) or pytorch_model.bin. No network access, ever: a hub id is not a source."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bake.modeltree import set_eval
from ..errors import ArchitectureError, SourceError, UserCodeError, first_line

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"{path} is a directory without a config.json.",
            "pass a checkpoint file, or a model directory written by transformers' save_pretrained or timm's "
            "save_for_hf.",
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SourceError(
            f"{config_path} is not readable JSON ({first_line(exc)}).", "fetch the model again."
        ) from None
    if not isinstance(config, dict):
        raise SourceError(f"{config_path} is not a JSON object.", "fetch the model again.")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The directory's state dict: model.safetensors, its sharded index, or pytorch_model.bin (weights only)."""
    from .read import check_tensors, read_checkpoint

    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return _state_dict_of(read_checkpoint(file)[0], file)
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{file} is not a shard index ({first_line(exc)}).", "fetch the model again.") from None
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = path / shard
            if Path(shard).name != shard or not shard_path.is_file():
                raise SourceError(f"{file} names shard {shard!r}, which is not in {path}.", "fetch the model again.")
            sd.update(_state_dict_of(read_checkpoint(shard_path)[0], shard_path))
        check_tensors(sd, file)
        return sd
    raise SourceError(f"{path} holds no weights ({', '.join(WEIGHT_FILES)}).", "fetch the model again.")


def _state_dict_of(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    from .read import find_state_dict

    return find_state_dict(obj, None, file)[0]


def _need(module: str, extra: str, path: Path):
    try:
        return __import__(module)
    except ImportError:
        raise SourceError(
            f"{path} is a {module} model directory, and {module} is not installed.",
            f"pip install 'wsfold[{extra}]'.",
        ) from None
    except Exception as exc:  # noqa: BLE001 - an installed but broken package
        raise SourceError(
            f"{path} is a {module} model directory, and importing {module} fails ({first_line(exc)}).",
            f"repair the installation: pip install 'wsfold[{extra}]'.",
        ) from None


def transformers_builder(path: Path, config: dict[str, Any]) -> tuple[Callable[[], nn.Module], str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _need("transformers", "hf", path)
    name = config["architectures"][0]
    if not isinstance(name, str) or not name.isidentifier() or not hasattr(transformers, name):
        raise ArchitectureError(
            f"{path}: config.json names architecture {name!r}, which transformers does not have.",
            "upgrade transformers, or pass --arch (wsfold never runs a model's remote code).",
        )
    cls = getattr(transformers, name)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArchitectureError(
            f"{path}: config.json names {name!r}, which is not a transformers model class.",
            "fix config.json's 'architectures', or pass --arch.",
        )
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own types for unreadable configs
        raise SourceError(
            f"{path}/config.json cannot be read by transformers ({first_line(exc)}).", "fetch it again."
        ) from None

    return _guarded(lambda: cls(cfg), f"transformers {name}(config)", "transformers"), f"transformers {name}"


def timm_builder(path: Path, config: dict[str, Any]) -> tuple[Callable[[], nn.Module], str]:
    timm = _need("timm", "timm", path)
    name = config["architecture"]
    kwargs = dict(config.get("model_args") or {})
    if "num_classes" in config:
        kwargs.setdefault("num_classes", config["num_classes"])

    build = _guarded(
        lambda: timm.create_model(name, pretrained=False, **kwargs), f"timm.create_model({name!r})", "timm"
    )
    return build, f"timm {name}"


def _guarded(build: Callable[[], nn.Module], call: str, library: str) -> Callable[[], nn.Module]:
    """``build``, with whatever the library's model code raises reported as the user's input (exit 2)."""

    def guarded() -> nn.Module:
        try:
            return build()
        except Exception as exc:  # noqa: BLE001 - the library's model code
            raise UserCodeError(
                f"{call} raised {type(exc).__name__}: {first_line(exc)}.",
                f"check the directory's config.json against the installed {library}.",
            ) from None

    return guarded


def load_directory(path: Path, *, arch: str | None = None, arch_kwargs=None):
    """A model directory as a LoadedModel: built by the library its config.json names (or by ``arch``), filled
    strictly with the directory's weights."""
    from .build import LoadedModel, build_and_load, build_arch

    config = read_config(path)
    if arch is not None:
        build, label = (lambda: build_arch(arch, arch_kwargs)), arch
    elif isinstance(config.get("architectures"), list) and config["architectures"]:
        build, label = transformers_builder(path, config)
    elif isinstance(config.get("architecture"), str):
        build, label = timm_builder(path, config)
    else:
        raise SourceError(
            f"{path}/config.json names no architecture ('architectures' for transformers, 'architecture' for timm).",
            "pass --arch package.module:callable for this directory.",
        )
    sd = read_weights(path)
    model = build_and_load(build, label, sd, None)
    del sd
    set_eval(model)
    return LoadedModel(model, path, "directory")
