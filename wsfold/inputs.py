"""Model inputs as export and verify see them: shapes, dtypes (floating, integer or bool), value ranges for random
samples, and names taken from the model's ``forward``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import OptionError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
FLOAT_DTYPES = {k: v for k, v in DTYPES.items() if v.is_floating_point}
# Random samples when no --input-range is given: floating inputs N(0, 1); integers uniform in [0, 10) (valid
# indices for any embedding of 10 rows or more); bool inputs 0 or 1.
DEFAULT_INT_RANGE = (0, 10)
# 2**31 values (8 GiB in float32): past that a random example input is a mistake, not a model's input.
MAX_INPUT_ELEMENTS = 2**31


@dataclass(frozen=True)
class ValueRange:
    """Random values for one input: uniform in [low, high) (integers: low..high-1); None: N(0, 1) for floats."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g})"


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.strip().split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise OptionError(f"--input-shape {text!r} is not a list of positive integers.", "write it like 1,3,224,224.")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise OptionError(
            f"--input-shape {text!r} has {math.prod(shape):,} elements, more than wsfold makes random inputs of "
            f"({MAX_INPUT_ELEMENTS:,}).",
            "use a smaller --input-shape.",
        )
    return shape


def parse_dtype(name: str | torch.dtype, option: str = "--input-dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise OptionError(f"{option} {name!r} is not one of {', '.join(DTYPES)}.", f"use {option} float32.")
    return DTYPES[name]


def parse_float_dtype(name: str | torch.dtype, option: str = "--dtype") -> torch.dtype:
    dtype = name if isinstance(name, torch.dtype) else FLOAT_DTYPES.get(name)
    if dtype is None or not dtype.is_floating_point:
        shown = name if isinstance(name, str) else str(name).removeprefix("torch.")
        raise OptionError(
            f"{option} {shown!r} is not a floating dtype wsfold casts to.", f"use one of {', '.join(FLOAT_DTYPES)}."
        )
    return dtype


def parse_range(text: str) -> ValueRange:
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        low = high = math.nan
    if len(parts) != 2 or not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise OptionError(
            f"--input-range {text!r} is not LOW,HIGH with LOW < HIGH.", "write it like --input-range 0,1000."
        )
    return ValueRange(low, high)


def per_input(values: Sequence | None, count: int, option: str) -> list:
    """One value per input: none given -> [None]*count; one -> the same for all; else exactly ``count``."""
    if not values:
        return [None] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise OptionError(
            f"{len(values)} {option} values for {count} input(s).", f"give one {option} per input, or one for all."
        )
    return list(values)


def forward_input_names(model: nn.Module, count: int) -> list[str]:
    """The names of the first ``count`` positional parameters of ``model.forward`` (x, time, pixel_values, ...),
    or input / input_0, input_1, ... when the signature does not say."""
    fallback = ["input"] if count == 1 else [f"input_{i}" for i in range(count)]
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return fallback
    positional = [
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < count or len(set(positional[:count])) != count:
        return fallback
    return positional[:count]


def check_names(names: Sequence[str], count: int) -> list[str]:
    if len(names) != count:
        raise OptionError(f"{len(names)} --input-name for {count} input(s).", "give one --input-name per input.")
    if len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise OptionError(f"--input-name values {list(names)} must be distinct and not empty.", "rename them.")
    return list(names)


def random_tensor(
    shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator, value_range: ValueRange | None = None
) -> torch.Tensor:
    """A seeded random input of ``dtype``: see DEFAULT_INT_RANGE and ValueRange for the values."""
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    if not dtype.is_floating_point:
        low, high = (value_range.low, value_range.high) if value_range else DEFAULT_INT_RANGE
        return torch.randint(math.ceil(low), max(math.ceil(low) + 1, math.ceil(high)), tuple(shape), generator=gen).to(
            dtype
        )
    if value_range is None:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(dtype)
    return (value_range.low + (value_range.high - value_range.low) * torch.rand(tuple(shape), generator=gen)).to(dtype)


def random_array(
    shape: Sequence[int], dtype: np.dtype, rng: np.random.Generator, value_range: ValueRange | None = None
) -> np.ndarray:
    """random_tensor's numpy counterpart, for onnxruntime feeds."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=tuple(shape)).astype(np.bool_)
    if dtype.kind in "iu":
        low, high = (value_range.low, value_range.high) if value_range else DEFAULT_INT_RANGE
        return rng.integers(math.ceil(low), max(math.ceil(low) + 1, math.ceil(high)), size=tuple(shape)).astype(dtype)
    if value_range is None:
        return rng.standard_normal(tuple(shape)).astype(dtype)
    return rng.uniform(value_range.low, value_range.high, size=tuple(shape)).astype(dtype)
