"""Calibration and holdout samples, streamed a batch at a time: .npz keyed by input name (or one array for a
one-input model), or .pt holding the same; samples along axis 0. Nothing holds the whole set in memory."""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CalibrationError, first_line


@dataclass
class InputSpec:
    """One graph input: its name, dtype, and each dimension (None where dynamic)."""

    name: str
    dtype: np.dtype
    dims: list[int | None]


class _NpzArray:
    """One array of an .npz, read rows at a time from the archive (stored or deflated)."""

    def __init__(self, path: Path, member: str) -> None:
        self.path, self.member = path, member
        with self._open() as f:
            self.shape, self.dtype, _ = self._header(f)

    def _open(self):
        archive = zipfile.ZipFile(self.path)
        f = archive.open(self.member)
        f.close_archive = archive.close  # type: ignore[attr-defined]
        return f

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran and len(shape) > 1:
            raise ValueError("a Fortran-ordered array (save it C-ordered: np.ascontiguousarray)")
        if dtype.hasobject:
            raise ValueError("an array of Python objects")
        return tuple(shape), dtype, f.tell()

    def rows(self, start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with self._open() as f:
            self._header(f)
            f.seek(f.tell() + start * row) if f.seekable() else f.read(start * row)
            for first in range(start, stop, batch):
                count = min(batch, stop - first)
                data = f.read(count * row)
                if len(data) != count * row:
                    raise ValueError("the array ends early (a truncated file)")
                yield np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])


class _TensorArray:
    """One tensor of a .pt file (loaded memory-mapped, weights only), sliced rows at a time."""

    def __init__(self, tensor) -> None:
        import torch

        self.tensor = tensor
        self.widen = tensor.dtype == torch.bfloat16  # numpy has no bfloat16
        self.shape = tuple(tensor.shape)
        self.dtype = np.dtype(np.float32) if self.widen else tensor[:0].numpy().dtype

    def rows(self, start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
        for first in range(start, stop, batch):
            part = self.tensor[first : min(stop, first + batch)]
            yield (part.float() if self.widen else part).numpy()


@dataclass
class Samples:
    """A calibration or holdout file checked against the graph's inputs; ``batches`` streams its samples."""

    path: Path
    option: str
    specs: list[InputSpec]
    arrays: dict[str, object]
    count: int
    extra: list[str] = field(default_factory=list)  # arrays the graph does not take (labels, ...)

    def batches(self, start: int = 0, stop: int | None = None, batch: int = 16) -> Iterator[dict[str, np.ndarray]]:
        stop = self.count if stop is None else stop
        streams = {s.name: self.arrays[s.name].rows(start, stop, batch) for s in self.specs}
        for _ in range(start, stop, batch):
            feed = {}
            for spec in self.specs:
                values = next(streams[spec.name])
                with np.errstate(over="ignore", invalid="ignore"):
                    feed[spec.name] = values.astype(spec.dtype)
            yield feed


def open_samples(path: Path, specs: list[InputSpec], option: str, preprocess=None) -> Samples:
    """``path`` opened and checked against the graph inputs ``specs`` (names, ranks, fixed sizes, dtypes), every
    value read once to refuse NaN/inf: a CalibrationError (exit 2) says what is wrong before any work. A folder
    is read as images with ``preprocess`` (see images.py)."""
    from .images import image_samples

    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{option} {path}: no such file.", "check the path.")
    if path.is_dir():
        folder = image_samples(path, specs, preprocess, option)
        return Samples(path, option, list(specs), {specs[0].name: folder}, folder.shape[0])
    if not path.is_file():
        raise CalibrationError(f"{option} {path} is not a regular file (a pipe or a device?).", "pass a .npz file.")
    arrays = _readable_arrays(path, option)
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}  # one array for a one-input model
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationError(
            f"{option} {path} has no array named {missing[0]!r} (it has: {', '.join(arrays) or 'nothing'}).",
            f"key the arrays by the graph's input names: {', '.join(names)}.",
        )
    counts = set()
    for spec in specs:
        array = arrays[spec.name]
        shape, dtype = array.shape, array.dtype
        if dtype.kind not in "biuf":
            raise CalibrationError(
                f"{option} {path}: array {spec.name!r} holds {dtype}, not numbers.", "store numbers."
            )
        if len(shape) != len(spec.dims) or any(d is not None and d != s for d, s in zip(spec.dims[1:], shape[1:])):
            want = ["N" if d is None else d for d in spec.dims]
            raise CalibrationError(
                f"{option} {path}: array {spec.name!r} has shape {list(shape)}; the graph takes {want} (samples "
                "along axis 0).",
                "store the inputs as the model takes them, preprocessed, one sample per row.",
            )
        counts.add(shape[0] if shape else 0)
    count = min(counts)
    if count == 0:
        raise CalibrationError(f"{option} {path} holds no samples (axis 0 is empty).", "store at least one sample.")
    if len(counts) > 1:
        raise CalibrationError(
            f"{option} {path}: its arrays hold different numbers of samples ({sorted(counts)}).",
            "store one row per sample in every array.",
        )
    samples = Samples(path, option, specs, {n: arrays[n] for n in names}, count, [k for k in arrays if k not in names])
    for i, feed in enumerate(samples.batches(batch=256)):
        for name, values in feed.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise CalibrationError(
                    f"{option} {path}: array {name!r} holds NaN/inf (in samples {i * 256} to "
                    f"{i * 256 + len(values) - 1}, or values too large for the graph's dtype).",
                    "store finite inputs.",
                )
    return samples


def _arrays(path: Path) -> dict[str, object]:
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".npy")]
        return {m.removesuffix(".npy"): _NpzArray(path, m) for m in members}
    if path.suffix in (".pt", ".pth"):
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(obj, torch.Tensor):
            obj = {"": obj}
        if not isinstance(obj, dict):
            raise CalibrationError(f"{path} holds a {type(obj).__name__}, not tensors.", "save a dict of tensors.")
        return {str(k): _TensorArray(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CalibrationError(f"{path}: unknown format {path.suffix!r}.", "use .npz keyed by input name, or .pt.")


def sample_shapes(path: Path, option: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's (shape, dtype) in a calibration file, from its headers only: the input shapes of a model that
    declares none."""
    path = Path(path)
    if not path.exists() or not path.is_file():
        open_samples(path, [], option)  # says what is wrong with the path
    return {name: (tuple(a.shape), a.dtype) for name, a in _readable_arrays(path, option).items()}


def _readable_arrays(path: Path, option: str) -> dict[str, object]:
    try:
        return _arrays(path)
    except CalibrationError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise CalibrationError(
            f"{option} {path} is unreadable ({first_line(exc)}).", "write it with numpy.savez or torch.save."
        ) from None
