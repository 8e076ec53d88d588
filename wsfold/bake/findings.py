"""What detection reports: derived-weight layers with their formula, and the modules it skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .formulas import (
    Formula,
)

KNOWN_CLASSES = {
    "StdConv2d": "timm StdConv2d",
    "StdConv2dSame": "timm StdConv2dSame",
    "ScaledStdConv2d": "timm ScaledStdConv2d (NFNet)",
    "ScaledStdConv2dSame": "timm ScaledStdConv2dSame (NFNet)",
    "WeightStandardizedConv2d": "transformers BiT WeightStandardizedConv2d",
    "ConvWS2d": "mmcv ConvWS2d",
    "ConvAWS2d": "mmcv ConvAWS2d",
    "SAConv2d": "mmcv SAConv2d",
    "WSConv2D": "NFNet WSConv2D",
    "WSConv2d": "NFNet WSConv2d",
}


@dataclass
class PadSpec:
    """Padding applied in forward before the op: a static F.pad, or TF-SAME padding computed from the input size."""

    mode: str  # constant | reflect | replicate | circular
    value: float
    pad: tuple[int, ...] | None  # F.pad order (last dim first); None when it depends on the input size
    same_dynamic: bool = False


@dataclass
class DerivedLayer:
    """A layer whose op receives a weight computed from its parameters (weight-standardized or otherwise)."""

    name: str
    type: str
    op: str
    geometry: dict[str, Any]
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    source_param: str
    formula: Formula | None
    misfit: float | None
    fan_in: int
    warnings: list[str] = field(default_factory=list)
    pad: PadSpec | None = None
    known_as: str | None = None
    bias_is_param: str | None = None
    # Kept only when no formula was identified: the baked weight is then the observed one.
    observed_weight: torch.Tensor | None = field(default=None, repr=False)
    observed_bias: torch.Tensor | None = field(default=None, repr=False)
    # The layer whose full probes established this one's formula (None: probed fully itself).
    probed_as: str | None = None
    # NaN/inf values in the weight the layer computes (a NaN in the stored weight, eps 0 on a constant filter).
    nonfinite: int = 0

    @property
    def formula_name(self) -> str:
        return self.formula.name if self.formula else "custom"

    @property
    def eps(self) -> float | None:
        return self.formula.eps if self.formula else None

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "known_as": self.known_as,
            "op": self.op,
            "formula": self.formula_name,
            "description": self.formula.description if self.formula else None,
            "eps": self.eps,
            "fan_in": self.fan_in,
            "out_channels": self.out_channels,
            "dtype": str(self.dtype).removeprefix("torch."),
            "padding": _pad_text(self.pad, self.geometry),
            "misfit": self.misfit,
            "probed_as": self.probed_as,
            "nonfinite": self.nonfinite,
            "warnings": list(self.warnings),
        }


def _pad_text(pad: PadSpec | None, geometry: dict[str, Any]) -> str:
    if pad is None:
        return str(geometry.get("padding", 0))
    if pad.same_dynamic:
        return "TF-SAME (depends on input size)"
    return f"F.pad{pad.pad} {pad.mode}"


@dataclass
class SkippedLayer:
    name: str
    type: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "reason": self.reason}


@dataclass
class Detection:
    """What detect_layers found: layers to bake, layers it will not bake, and modules it could not run."""

    layers: list[DerivedLayer]
    unsupported: list[SkippedLayer]
    unprobed: list[SkippedLayer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "unsupported": [u.to_dict() for u in self.unsupported],
            "unprobed": [u.to_dict() for u in self.unprobed],
        }


class Finding(NamedTuple):
    """One candidate module's verdict, as iter_layers hands it over. ``weight`` is the layer's exact weight (its
    formula in float64, rounded once), present only when asked for and a formula was identified."""

    result: DerivedLayer | SkippedLayer
    weight: torch.Tensor | None = None


def _unprobed(skipped: SkippedLayer) -> bool:
    return skipped.reason.startswith("could not be run")


def add_finding(detection: Detection, result: DerivedLayer | SkippedLayer) -> None:
    """File one verdict in the list of ``detection`` it belongs to."""
    if isinstance(result, DerivedLayer):
        detection.layers.append(result)
    else:
        (detection.unprobed if _unprobed(result) else detection.unsupported).append(result)
