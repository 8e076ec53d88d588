"""wsfold: bake weight-standardized layers into plain convolutions, export constant-weight ONNX, verify it."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model",
    "detect_layers",
    "bake_model",
    "save_baked",
    "WsfoldError",
]


def __getattr__(name: str):
    # Lazy: `wsfold --help` and `import wsfold` stay fast; torch is imported on first use.
    if name == "load_model":
        from .load import load_model

        return load_model
    if name == "detect_layers":
        from .detect import detect_layers

        return detect_layers
    if name == "bake_model":
        from .bake import bake_model

        return bake_model
    if name == "save_baked":
        from .save import save_baked

        return save_baked
    if name == "WsfoldError":
        from .errors import WsfoldError

        return WsfoldError
    raise AttributeError(name)
