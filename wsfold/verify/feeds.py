"""What the graph is run on: seeded random batches at the graph's dynamic sizes, or the user's --inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..bake.modeltree import (
    model_dtype,
)
from ..errors import VerifyInputError, first_line
from ..inputs import ValueRange, per_input, random_array

MAX_SAMPLES = 10_000
_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def sample_inputs(
    session,
    shapes: list[tuple[int, ...]] | None,
    samples: int,
    seed: int,
    default_shape: tuple[int, ...] | None,
    value_ranges: list[ValueRange | None] | None = None,
    grow: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Seeded random inputs (see inputs.random_array, or ``value_ranges`` per input): each sample at batch 1 and
    (if the batch is dynamic) batch 3, and at two spatial sizes (the base, and ``grow`` more) when those are
    dynamic."""
    inputs = session.get_inputs()
    if shapes and len(shapes) != len(inputs):
        raise VerifyInputError(
            f"{len(shapes)} --input-shape given for a graph with {len(inputs)} input(s).", "give one per graph input."
        )
    ranges = per_input(value_ranges, len(inputs), "--input-range")
    for spec, value_range in zip(inputs, ranges):
        _check_range(spec, value_range)
    bases, dyn_batch, dyn_space = [], False, False
    for i, spec in enumerate(inputs):
        dims = list(spec.shape)
        if shapes:
            base = list(shapes[i])
        else:
            base = []
            for j, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    base.append(d)
                elif j == 0:
                    base.append(1)
                elif default_shape is not None and len(default_shape) == len(dims):
                    base.append(default_shape[j])
                else:
                    raise VerifyInputError(
                        f"input {spec.name!r} has dynamic dimension {j} ({d}) and no size is known.",
                        "pass --input-shape.",
                    )
        dyn_batch |= bool(dims) and not (isinstance(dims[0], int) and dims[0] > 0)
        dyn_space |= any(not (isinstance(d, int) and d > 0) for d in dims[2:])
        bases.append(base)
    variants = []
    for batch in [1, 3] if dyn_batch else [None]:
        for extra in [0, grow] if dyn_space and grow else [0]:
            variants.append((batch, extra))
    out = []
    for s in range(samples):
        for batch, extra in variants:
            gen = np.random.default_rng(seed + s)
            feed = {}
            for spec, base, value_range in zip(inputs, bases, ranges):
                dims = list(spec.shape)
                shape = list(base)
                if batch is not None:
                    shape[0] = batch
                for j in range(2, len(shape)):
                    if extra and not (isinstance(dims[j], int) and dims[j] > 0):
                        shape[j] += extra
                try:
                    feed[spec.name] = random_array(shape, _NP_DTYPES.get(spec.type, np.float32), gen, value_range)
                except (MemoryError, ValueError) as exc:
                    raise VerifyInputError(
                        f"input {spec.name!r} of shape {shape} cannot be made ({type(exc).__name__}: "
                        f"{first_line(exc)}).",
                        "use a smaller --input-shape.",
                    ) from None
            out.append(feed)
    return out


def _check_range(spec, value_range: ValueRange | None) -> None:
    """A --input-range whose values the input's dtype can hold (else the samples are inf, or wrap around)."""
    if value_range is None:
        return
    dtype = np.dtype(_NP_DTYPES.get(spec.type, np.float32))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        fits = info.min <= value_range.low and value_range.high <= float(info.max) + 1
    elif dtype.kind == "f":
        fits = max(abs(value_range.low), abs(value_range.high)) <= float(np.finfo(dtype).max)
    else:
        fits = True
    if not fits:
        raise VerifyInputError(
            f"--input-range {value_range} does not fit input {spec.name!r} ({dtype}).",
            f"give a range within {dtype}'s values.",
        )


def check_inputs_file(path: Path) -> None:
    """An --inputs file that can be read: said before any other work (a pipe would block the first read)."""
    if not path.exists():
        raise VerifyInputError(f"--inputs {path}: no such file.", "check the path.")
    if path.is_dir():
        raise VerifyInputError(f"--inputs {path} is a directory.", "pass one .npz or .pt file.")
    if not path.is_file():
        raise VerifyInputError(
            f"--inputs {path} is not a regular file (a pipe or a device?).", "save the inputs to a .npz file first."
        )


def load_inputs(path: Path, session) -> list[dict[str, np.ndarray]]:
    """Real data: .npz keyed by input name (arrays may hold several batches along dim 0), or .pt (a tensor or a
    dict of tensors)."""
    names = [i.name for i in session.get_inputs()]
    check_inputs_file(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        elif path.suffix in (".pt", ".pth"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not the user's concern here
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                obj = {names[0]: obj} if len(names) == 1 else {}
            arrays = {k: v.numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}
        else:
            raise VerifyInputError(
                f"--inputs {path}: unknown format {path.suffix!r}.", "use .npz keyed by input name, or .pt."
            )
    except VerifyInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise VerifyInputError(
            f"--inputs {path} is unreadable ({first_line(exc)}).", "write it with numpy.savez."
        ) from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise VerifyInputError(
            f"--inputs {path} has no array named {missing[0]!r} (it has: {', '.join(arrays) or 'nothing'}).",
            f"key the arrays by the graph's input names: {', '.join(names)}.",
        )
    types = {i.name: _NP_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
    for n in names:
        a = arrays[n]
        if a.dtype.kind not in "biuf":
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} holds {a.dtype} values, not numbers.", "store numeric arrays."
            )
        if a.size == 0:
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} is empty (shape {list(a.shape)}); nothing would be compared.",
                "store at least one sample (batch >= 1).",
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} holds {int((~np.isfinite(a)).sum())} NaN/inf value(s); the "
                "comparison would not be about the graph.",
                "store finite inputs.",
            )
    with np.errstate(over="ignore", invalid="ignore"):
        feed = {n: arrays[n].astype(types[n]) for n in names}
    for n, a in feed.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VerifyInputError(
                f"--inputs {path}: array {n!r} overflows the graph's {a.dtype} ({int((~np.isfinite(a)).sum())} "
                "value(s) become inf).",
                "store inputs within the graph input's range.",
            )
    return [feed]


def _as_args(arrays: list[np.ndarray], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Feed arrays as model arguments: floating ones at ``dtype``, integer and bool ones as they are."""
    return tuple(
        torch.from_numpy(np.ascontiguousarray(a)).to(dtype) if a.dtype.kind == "f" else torch.from_numpy(a)
        for a in arrays
    )


def _check_feed(session, feed: dict[str, np.ndarray]) -> None:
    for spec in session.get_inputs():
        want, got = list(spec.shape), list(feed[spec.name].shape)
        fixed = [d if isinstance(d, int) and d > 0 else None for d in want]
        if len(fixed) != len(got) or any(f is not None and f != g for f, g in zip(fixed, got)):
            shown = ["N" if f is None else f for f in fixed]
            raise VerifyInputError(
                f"the ONNX graph takes input {spec.name!r} of shape {shown}, not {got}.",
                "fix --input-shape or --inputs to fit the graph (it may be another model's).",
            )


def _exported_shapes(meta: dict[str, str], count: int) -> list[tuple[int, ...]] | None:
    """The input shapes the graph was exported with (``wsfold_input_shapes``), when it records one per input."""
    try:
        shapes = json.loads(meta.get("wsfold_input_shapes", "null"))
    except (json.JSONDecodeError, RecursionError):
        return None
    if (
        isinstance(shapes, list)
        and len(shapes) == count
        and all(isinstance(s, list) and all(isinstance(d, int) and 0 < d < 2**31 for d in s) for s in shapes)
    ):
        return [tuple(s) for s in shapes]
    return None


def _accepted_growth(session, model, shapes, default, value_ranges, notes: list[str]) -> int:
    """For a graph with dynamic spatial dims: how many more rows and columns a second sample size has, one the
    original model accepts (a U-Net takes only multiples of its downsampling); 0, with a note, when none is."""
    if not any(not (isinstance(d, int) and d > 0) for spec in session.get_inputs() for d in list(spec.shape)[2:]):
        return 0
    base = sample_inputs(session, shapes, 1, 0, default, value_ranges, grow=0)[0]
    sizes = [list(a.shape) for a in base.values()]
    largest = max((max(s[2:], default=0) for s in sizes), default=0)
    for grow in dict.fromkeys([1, 2, 4, 8, 16, 32, largest]):
        if grow <= 0:
            continue
        feed = sample_inputs(session, shapes, 1, 0, default, value_ranges, grow=grow)[-1]
        try:
            with torch.no_grad():
                model(*_as_args([feed[i.name] for i in session.get_inputs()], model_dtype(model)))
        except Exception:  # noqa: BLE001 - the model refuses that size: try the next
            continue
        return grow
    notes.append(f"the model accepts no other spatial size near {sizes}: dynamic sizes checked at that one only")
    return 0
