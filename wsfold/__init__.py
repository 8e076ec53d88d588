"""wsfold: bake weight-standardized layers into plain convolutions, export constant-weight ONNX, verify it."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. Imported lazily so that `wsfold --help` and `import wsfold` stay fast.
_API = {
    "load_model": "load",
    "detect_layers": "detect",
    "bake_model": "bake",
    "fold_model": "fold",
    "save_baked": "save",
    "export_onnx": "export",
    "verify_onnx": "verify",
    "WsfoldError": "errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'wsfold' has no attribute {name!r}")
