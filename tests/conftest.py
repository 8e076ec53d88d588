from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
CKPT = FIXTURES / "ckpt"
sys.path.insert(0, str(FIXTURES))

# A wide, non-TTY console for CLI output; no colour codes in assertions.
os.environ["COLUMNS"] = "200"
os.environ["NO_COLOR"] = "1"
os.environ.pop("WSFOLD_DEBUG", None)

from catalog import FIXTURES as CATALOG  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _checkpoints():
    """The checkpoints are tracked in git; regenerate them if a clean checkout lacks one."""
    if not all((CKPT / spec["file"]).exists() for spec in CATALOG.values()):
        import make_fixtures

        make_fixtures.main()


def arch_spec(name: str) -> str:
    return f"{FIXTURES / 'models.py'}:{CATALOG[name]['arch']}"


def ckpt(name: str) -> Path:
    return CKPT / CATALOG[name]["file"]


def load_fixture(name: str):
    from wsfold.load.checkpoint import load_model

    return load_model(ckpt(name), arch=arch_spec(name)).model


def fixture_input(name: str, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    shape = list(CATALOG[name]["input"])
    if batch is not None:
        shape[0] = batch
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(CATALOG[name].get("dtype", torch.float32))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's output scale (max |b|)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


# Output tolerance relative to the output scale, by dtype: float32 as the issue demands, half precision at a few ulp.
OUT_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def scale_one_filter(src_onnx: Path, dst: Path, factor: float = 1.01, index: int = 0) -> None:
    """Write ``src_onnx`` to ``dst`` with filter ``index`` of its first Conv initializer scaled by ``factor``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits)
    w = numpy_helper.to_array(inits[conv.input[1]]).copy()
    w[index] = (w[index].astype(np.float32) * factor).astype(w.dtype)
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w, conv.input[1]))
    onnx.save(model, str(dst))
