"""Write a baked model: a whole pickled module (.pt) or a state dict with a manifest (.safetensors)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import __version__
from .bake import BakeReport
from .errors import OutputError, first_line
from .load import MANIFEST_KEY
from .modeltree import require_module
from .paths import atomic_path, check_output

if TYPE_CHECKING:
    from .fold import FoldReport
    from .pipeline import Prepared

SUFFIXES = (".pt", ".safetensors")


def manifest(
    report: BakeReport | None, fold_report: FoldReport | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> dict:
    """Each baked key, the tensor it came from, formula and eps, what was folded, and the wsfold version; with
    ``tensors`` (what is written), the sha256 of each baked tensor, checked when the file is loaded."""
    from .load import tensor_digest

    tensors = tensors or {}
    return {
        "wsfold_version": __version__,
        "folded": [f.to_dict() for f in fold_report.folded] if fold_report is not None else [],
        "layers": [
            {
                "name": b.layer.name,
                "weight": b.weight_key,
                "bias": b.bias_key,
                "from": ".".join(p for p in (b.layer.name, b.layer.source_param) if p),
                "type": b.layer.type,
                "formula": b.layer.formula_name,
                "eps": b.layer.eps,
                "digests": {k: tensor_digest(tensors[k]) for k in (b.weight_key, b.bias_key) if k in tensors},
            }
            for b in (report.baked if report is not None else [])
        ],
    }


def save_baked(
    model: nn.Module | Prepared,
    out: str | Path,
    *,
    bake_report: BakeReport | None = None,
    fold_report: FoldReport | None = None,
    force: bool = False,
    source: str | Path | None = None,
) -> Path:
    """Save a baked model (or the result of :func:`wsfold.prepare`, which brings its reports and source) to
    ``out`` atomically, the format from the suffix; returns the path. The reports go into a .safetensors
    manifest."""
    from .pipeline import Prepared

    if isinstance(model, Prepared):
        model, bake_report, fold_report, source = model.model, model.bake, model.fold, source or model.source
    require_module(model, "save_baked")
    out = check_output(Path(out), force=force, source=Path(source) if source else None, suffixes=SUFFIXES)
    with atomic_path(out, force=force) as tmp:
        if out.suffix == ".pt":
            try:
                torch.save(model, tmp)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise OutputError(
                    f"the baked model cannot be pickled whole ({type(exc).__name__}: {first_line(exc)}).",
                    f"write a state dict instead: -o {out.with_suffix('.safetensors')}.",
                ) from None
        else:
            from safetensors.torch import save_file

            seen: dict[tuple[int, int], str] = {}
            tensors = {}
            for key, t in model.state_dict().items():
                # safetensors refuses shared storage (tied weights): store a copy of each alias.
                ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
                t = t.detach()
                tensors[key] = t.clone().contiguous() if ident in seen or not t.is_contiguous() else t
                seen[ident] = key
            save_file(
                tensors, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest(bake_report, fold_report, tensors))}
            )
    return out
