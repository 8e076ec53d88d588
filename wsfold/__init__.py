"""wsfold: bake weight-standardized layers into plain convolutions, export constant-weight ONNX, verify it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# Public name -> module that defines it. Imported lazily so that `wsfold --help` and `import wsfold` stay fast.
_API = {
    "prepare": "pipeline",
    "Prepared": "pipeline",
    "load_model": "load.checkpoint",
    "load_baked": "load.checkpoint",
    "detect_layers": "bake.detect",
    "iter_layers": "bake.detect",
    "bake_model": "bake.baker",
    "fold_model": "bake.fold",
    "save_baked": "artifacts.save",
    "export_onnx": "onnx.export",
    "verify_onnx": "verify.verification",
    "quantize_onnx": "quantize.int8",
    "verify_int8": "quantize.verdict",
    "WsfoldError": "errors",
}
__all__ = [
    "__version__",
    "prepare",
    "Prepared",
    "load_model",
    "load_baked",
    "detect_layers",
    "iter_layers",
    "bake_model",
    "fold_model",
    "save_baked",
    "export_onnx",
    "verify_onnx",
    "quantize_onnx",
    "verify_int8",
    "WsfoldError",
]

if TYPE_CHECKING:  # the same names, visible to type checkers and IDEs
    from .artifacts.save import save_baked
    from .bake.baker import bake_model
    from .bake.detect import detect_layers, iter_layers
    from .bake.fold import fold_model
    from .errors import WsfoldError
    from .load.checkpoint import load_baked, load_model
    from .onnx.export import export_onnx
    from .pipeline import Prepared, prepare
    from .quantize.int8 import quantize_onnx
    from .quantize.verdict import verify_int8
    from .verify.verification import verify_onnx


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'wsfold' has no attribute {name!r}")
