"""A folder of images (PNG/JPEG) as calibration samples, read with the model's declared preprocessing (timm's
pretrained_cfg, transformers' preprocessor_config.json) or explicit --image-size/--mean/--std; one image at a time."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError

SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL's resampling codes, as transformers' preprocessor_config.json stores them ("resample": 3 is bicubic).
_PIL_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class Preprocess:
    """Resize the shorter side to ``resize``, crop the centre to ``size`` (H, W), scale to [0, 1], normalize."""

    size: tuple[int, int]
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    source: str = "--image-size/--mean/--std"

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "from": self.source}  # fmt: skip


def declared_preprocess(model, source: Path | None) -> Preprocess | None:
    """What the model says about its inputs: timm's pretrained_cfg, or a model directory's preprocessor_config.json."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size") and cfg.get("mean") and cfg.get("std"):
            _, h, w = (int(v) for v in cfg["input_size"])
            crop = float(cfg.get("crop_pct") or 1.0)
            return Preprocess((h, w), int(math.floor(min(h, w) / crop)), tuple(cfg["mean"]), tuple(cfg["std"]),
                              str(cfg.get("interpolation") or "bilinear"), f"the model's {attr}")  # fmt: skip
    config = Path(source) / "preprocessor_config.json" if source is not None and Path(source).is_dir() else None
    if config is not None and config.is_file():
        try:
            cfg = json.loads(config.read_text())
            size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
            if isinstance(size, int):
                size = {"shortest_edge": size}
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            hw = (int(crop.get("height") or size.get("height")), int(crop.get("width") or size.get("width")))
            resize = int(size.get("shortest_edge") or min(size.get("height", hw[0]), size.get("width", hw[1])))
            mean = tuple(cfg["image_mean"]) if cfg.get("do_normalize", True) else (0.0,)
            std = tuple(cfg["image_std"]) if cfg.get("do_normalize", True) else (1.0,)
            return Preprocess(hw, resize, mean, std, _PIL_CODES.get(cfg.get("resample", 2), "bilinear"), str(config))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CalibrationError(
                f"{config} does not say the input size and normalization ({type(exc).__name__}: {exc}).",
                "pass --image-size H,W --mean M[,M,M] --std S[,S,S].",
            ) from None
    return None


def explicit_preprocess(size: str | None, mean: str | None, std: str | None) -> Preprocess | None:
    """--image-size H,W (or S), --mean and --std (one value or one per channel); None when none is given."""
    if size is None and mean is None and std is None:
        return None
    if size is None or mean is None or std is None:
        raise CalibrationError(
            "--image-size, --mean and --std go together (the normalization the model was trained with).",
            "pass all three: e.g. --image-size 224,224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 (0 and 1 "
            "for a model that takes [0, 1] pixels).",
        )

    def floats(text: str | None, option: str, default: float) -> tuple[float, ...]:
        if text is None:
            return (default,)
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise CalibrationError(
                f"{option} {text!r} is not a list of numbers.", f"use e.g. {option} 0.5,0.5,0.5."
            ) from None
        if not values or not all(math.isfinite(v) for v in values) or (option == "--std" and min(values) <= 0):
            raise CalibrationError(f"{option} {text!r} must be finite numbers (--std above 0).", f"fix {option}.")
        return values

    try:
        dims = tuple(int(v) for v in size.split(","))
    except ValueError:
        raise CalibrationError(f"--image-size {size!r} is not H,W.", "use e.g. --image-size 224,224.") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) <= 0 or max(dims) > 16384:
        raise CalibrationError(f"--image-size {size!r} must be two sizes from 1 to 16384.", "use --image-size 224,224.")
    return Preprocess(dims, min(dims), floats(mean, "--mean", 0.0), floats(std, "--std", 1.0))


class ImageFolder:
    """The images of a folder (sorted by name) as one (N, C, H, W) float32 array, read a batch at a time."""

    def __init__(self, folder: Path, prep: Preprocess, channels: int) -> None:
        if importlib.util.find_spec("PIL") is None:
            raise CalibrationError(
                f"{folder} is a folder of images, and reading images needs Pillow.", "pip install 'wsfold[images]'."
            )
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not self.files:
            raise CalibrationError(
                f"{folder} holds no PNG or JPEG image.", "pass a folder of .png/.jpg images, or a .npz of inputs."
            )
        for values, option in ((prep.mean, "--mean"), (prep.std, "--std")):
            if len(values) not in (1, channels):
                raise CalibrationError(
                    f"{option} has {len(values)} values for a {channels}-channel input.", f"give 1 or {channels}."
                )
        self.prep, self.channels = prep, channels
        self.shape = (len(self.files), channels, *prep.size)
        self.dtype = np.dtype(np.float32)

    def read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                h, w = self.prep.size
                scale = self.prep.resize / min(img.size)
                resample = getattr(Image.Resampling, self.prep.interpolation.upper(), Image.Resampling.BILINEAR)
                img = img.resize((max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))), resample)
                left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
                array = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise CalibrationError(f"{path} cannot be read as an image ({exc}).", "remove it or replace it.") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        mean = np.asarray(self.prep.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.prep.std, np.float32).reshape(-1, 1, 1)
        return (array - mean) / std

    def rows(self, start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
        for first in range(start, stop, batch):
            yield np.stack([self.read(p) for p in self.files[first : min(stop, first + batch)]])


def image_samples(folder: Path, specs: Sequence, prep: Preprocess | None, option: str) -> ImageFolder:
    """The images of ``folder`` as the one (N, C, H, W) input of the graph whose inputs are ``specs``."""
    if len(specs) != 1 or len(specs[0].dims) != 4:
        raise CalibrationError(
            f"{option} {folder} is a folder of images, but the graph takes {len(specs)} input(s) of rank "
            f"{', '.join(str(len(s.dims)) for s in specs)}; images feed one (N, C, H, W) input.",
            "store the inputs in a .npz keyed by input name.",
        )
    spec = specs[0]
    if not any(p.suffix.lower() in SUFFIXES and p.is_file() for p in folder.iterdir()):
        raise CalibrationError(
            f"{option} {folder} holds no PNG or JPEG image.", "pass a folder of .png/.jpg images, or a .npz of inputs."
        )
    if prep is None:
        raise CalibrationError(
            f"{option} {folder} is a folder of images and the model declares no preprocessing.",
            "pass --image-size H,W --mean M[,M,M] --std S[,S,S] (as the model was trained).",
        )
    fixed = [d for d in spec.dims[2:] if d is not None]
    if fixed and tuple(spec.dims[2:]) != tuple(prep.size):
        raise CalibrationError(
            f"the images would be {prep.size[0]}x{prep.size[1]} ({prep.source}); the graph takes "
            f"{spec.dims[2]}x{spec.dims[3]}.",
            "pass --image-size to match the graph.",
        )
    return ImageFolder(folder, prep, spec.dims[1] or 3)
