"""Write a baked model: a whole pickled module (.pt) or a state dict with a manifest (.safetensors)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .bake import BakeReport
from .errors import OutputError
from .io import atomic_path, check_output
from .load import MANIFEST_KEY

SUFFIXES = (".pt", ".safetensors")


def manifest(report: BakeReport, fold_report=None) -> dict:
    """Each baked key, the tensor it came from, formula and eps, what was folded, and the wsfold version."""
    return {
        "wsfold_version": __version__,
        "folded": list(fold_report.folded) if fold_report is not None else [],
        "layers": [
            {
                "name": b.layer.name,
                "weight": b.weight_key,
                "bias": b.bias_key,
                "from": ".".join(p for p in (b.layer.name, b.layer.source_param) if p),
                "type": b.layer.type,
                "formula": b.layer.formula_name,
                "eps": b.layer.eps,
            }
            for b in report.baked
        ],
    }


def save_baked(
    model: nn.Module,
    report: BakeReport,
    out: str | Path,
    *,
    force: bool = False,
    source: Path | None = None,
    fold_report=None,
) -> Path:
    """Save ``model`` to ``out`` (format from the suffix) atomically; return the path."""
    out = check_output(Path(out), force=force, source=source, suffixes=SUFFIXES)
    with atomic_path(out) as tmp:
        if out.suffix == ".pt":
            try:
                torch.save(model, tmp)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise OutputError(
                    f"the baked model cannot be pickled whole ({type(exc).__name__}: {str(exc).splitlines()[0]}).",
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
            save_file(tensors, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest(report, fold_report))})
    return out
