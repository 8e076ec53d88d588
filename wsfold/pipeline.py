"""The whole preparation every command starts with, as one call: load -> detect and bake -> fold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bake.baker import BakeReport, bake_model
from .bake.findings import Detection
from .bake.fold import NOT_ASKED, Folded, FoldReport, fold_model
from .bake.modeltree import model_dtype, structural_copy
from .inputs import parse_float_dtype
from .load.build import LoadedModel
from .load.checkpoint import load_model

# progress(stage, done, total): a stage's name and how far it is; total 0 when it has no count.
Progress = Callable[[str, int, int], None]


@dataclass
class Prepared:
    """What :func:`prepare` returns: the baked (and folded) model, the model as loaded, and what was done."""

    # every derived-weight layer baked; normalizers folded unless fold=False. None once a caller let it go (the
    # CLI's verify: a graph's session needs the memory more, and the per-layer check bakes again when it runs).
    model: nn.Module | None
    original: nn.Module | None  # as loaded (unchanged); None when prepare was asked not to keep it
    bake: BakeReport
    fold: FoldReport
    source: Path | None = None
    loaded: LoadedModel | None = None

    @property
    def detection(self) -> Detection:
        return self.bake.detection

    @property
    def folded(self) -> bool:
        """Whether folding ran (whatever it found): the state a graph exported from ``model`` is in."""
        return self.fold.skipped is None

    @property
    def baked_layers(self) -> int:
        """Layers baked here, or by the wsfold run that wrote an already baked SOURCE."""
        manifest = self.loaded.manifest if self.loaded is not None else None
        return len(self.bake.baked) or len((manifest or {}).get("layers", []))

    @property
    def notes(self) -> list[str]:
        return list(self.loaded.notes) if self.loaded is not None else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source) if self.source is not None else None,
            "state_key": self.loaded.state_key if self.loaded is not None else None,
            "notes": self.notes,
            **self.detection.to_dict(),
            **self.fold.to_dict(),
        }


def prepare(
    source: str | Path | nn.Module,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    state_key: str | None = None,
    allow_pickle: bool = False,
    fold: bool = True,
    keep_original: bool = True,
    allow_nonfinite: bool = False,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> Prepared:
    """Load SOURCE (a checkpoint path, or an nn.Module you already have), bake every weight-standardized layer
    into a plain one, and fold inference-static normalizers into them (unless ``fold=False``).

    A model handed in is never changed. With ``keep_original=False`` a checkpoint's model is baked in place and
    not kept (``original`` is None), which halves peak memory when only the baked model is wanted. A layer whose
    weight holds NaN or inf raises NonFiniteError unless ``allow_nonfinite``. With ``dtype``, the baked model is
    cast to it: the standardized weights are computed in float64, folding runs in float64, and every weight is
    rounded once, to ``dtype``."""
    if not isinstance(source, (str, Path, nn.Module)):
        raise TypeError(f"prepare expects a checkpoint path or an nn.Module, not {type(source).__name__}")
    if arch is not None and not isinstance(arch, str):
        raise TypeError(
            f"arch is a 'package.module:callable' or 'path/to/file.py:callable' string, not {type(arch).__name__}"
        )
    if progress is not None and not callable(progress):
        raise TypeError("progress must be a callable progress(stage, done, total)")
    loaded = None
    path = None
    if isinstance(source, nn.Module):
        original, keep_original = source, True
    else:
        path = Path(source)
        _report(progress, f"load {path.name}")
        loaded = load_model(path, arch=arch, arch_kwargs=arch_kwargs, state_key=state_key, allow_pickle=allow_pickle)
        original = loaded.model
    if loaded is not None and loaded.kind == "exported":
        # A torch.export program holds a graph, not layers: what wsfold writes as .pt2 is baked and folded already.
        skipped = "SOURCE is a torch.export program (baked and folded when wsfold wrote it)"
        return Prepared(
            original, original, BakeReport(Detection([], [], [])), FoldReport(skipped=skipped), path, loaded
        )
    # Each layer is baked as soon as it is probed, from the weight the probe already standardized.
    count = None if progress is None else (lambda done, total: progress("probe layers", done, total))
    dtype = None if dtype is None else parse_float_dtype(dtype)
    cast = dtype is not None and dtype != model_dtype(original)
    baked, bake_report = bake_model(
        original,
        inplace=not keep_original,
        allow_nonfinite=allow_nonfinite,
        weight_dtype=torch.float64 if cast else None,
        progress=count,
    )
    if cast:
        baked = structural_copy(baked, torch.float64)  # exact: folding below then rounds nothing
    fold_report = FoldReport(skipped=NOT_ASKED)
    if fold:
        _report(progress, "fold normalizers")
        baked, fold_report = fold_model(baked, inplace=not keep_original or cast)
    if cast:
        baked = structural_copy(baked, dtype)
    if loaded is not None and loaded.manifest and not fold_report.folded:
        # An already baked SOURCE: what folded was folded when it was written.
        fold_report.folded = [Folded(**entry) for entry in loaded.manifest.get("folded", [])]
    if loaded is not None and not keep_original:
        loaded.model = baked
    return Prepared(baked, original if keep_original else None, bake_report, fold_report, path, loaded)


def _report(progress: Progress | None, stage: str) -> None:
    if progress is not None:
        progress(stage, 0, 0)
