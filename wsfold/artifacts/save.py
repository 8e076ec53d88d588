"""Write a baked model: a whole pickled module (.pt) or a state dict with a manifest (.safetensors)."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import __version__
from ..bake.baker import BakeReport
from ..bake.modeltree import require_module
from ..errors import OutputError, first_line
from ..io.paths import atomic_path, check_output
from ..load.read import BAKED_MARKER, MANIFEST_KEY

if TYPE_CHECKING:
    from ..bake.fold import FoldReport
    from ..pipeline import Prepared

SUFFIXES = (".safetensors", ".pt2", ".pt")


def manifest(
    report: BakeReport | None, fold_report: FoldReport | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> dict:
    """Each baked key, the tensor it came from, formula and eps, what was folded, and the wsfold version; with
    ``tensors`` (what is written), the sha256 of each baked tensor, checked when the file is loaded."""
    from ..load.read import tensor_digests

    tensors = tensors or {}
    baked = report.baked if report is not None else []
    digests = tensor_digests({k: tensors[k] for b in baked for k in (b.weight_key, b.bias_key) if k in tensors})
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
                "digests": {k: digests[k] for k in (b.weight_key, b.bias_key) if k in digests},
            }
            for b in baked
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
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    input_dtypes: Sequence[torch.dtype | str | None] | torch.dtype | str | None = None,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    fsync: bool = False,
) -> Path:
    """Save a baked model (or the result of :func:`wsfold.prepare`, which brings its reports and source) to
    ``out`` atomically, the format from the suffix; returns the path.

    - ``.safetensors``: the state dict, with a manifest (what was baked and folded, a digest per baked tensor);
      it loads back with :func:`wsfold.load_baked` and the same architecture.
    - ``.pt2``: a torch.export ExportedProgram (input shapes and dtypes as for export_onnx, the batch dynamic
      unless ``dynamic_batch=False``, spatial sizes with ``dynamic_hw``); it loads with torch alone.
    - ``.pt``: the whole module, pickled; loading it runs code and needs the architecture's classes.

    The file is written beside ``out`` and moved into place when complete; ``fsync`` also flushes it to disk
    first, so that it survives a power loss (see paths.atomic_path)."""
    from ..pipeline import Prepared

    if isinstance(model, Prepared):
        model, bake_report, fold_report, source = model.model, model.bake, model.fold, source or model.source
    require_module(model, "save_baked")
    out = check_output(Path(out), force=force, source=Path(source) if source else None, suffixes=SUFFIXES)
    if out.suffix == ".pt2":
        program = exported_program(model, input_shapes, input_dtypes, dynamic_batch, dynamic_hw)
    # Checked first: a writer that runs out of space fails in its own way (torch's .pt2 writer aborts the process).
    # A .pt2 archive also holds the program (graph, signatures), which grows with the graph, not the weights:
    # its size is counted by serializing it once into a sink that keeps nothing.
    _require_space(out, _archive_bytes(program) if out.suffix == ".pt2" else _tensor_bytes(model))
    with atomic_path(out, force=force, durable=fsync) as tmp:
        try:
            if out.suffix == ".pt":
                _write_pickle(model, tmp, out)
            elif out.suffix == ".pt2":
                torch.export.save(program, tmp)
            else:
                _write_safetensors(model, tmp, bake_report, fold_report)
        except OutputError:
            raise
        except Exception as exc:
            code = _out_of_space(exc, out)
            if code is not None:
                raise OSError(code, os.strerror(code), str(out)) from None
            raise
    return out


class _Counting(io.RawIOBase):
    """A seekable sink that keeps nothing but the size of what is written to it."""

    def __init__(self) -> None:
        self.size = self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


def _archive_bytes(program) -> int:
    """The size torch.export.save gives this program's archive (torch's writer aborts the process when the disk
    refuses it part of the way)."""
    sink = _Counting()
    torch.export.save(program, sink)
    return sink.size


def _tensor_bytes(model: nn.Module) -> int:
    """The bytes of the model's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _require_space(out: Path, need: int) -> None:
    """Refuse before writing when the file system, or the process's file size limit (ulimit -f), has less room
    than ``need`` bytes."""
    limit = _file_size_limit()
    if limit is not None and limit < need:
        raise OutputError(
            f"this process may write files of {size_text(limit)} at most (ulimit -f); the baked model needs about "
            f"{size_text(need)}.",
            "raise the limit (ulimit -f unlimited) and run again.",
        )
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        return  # unknown: the write itself will tell
    if free < need:
        raise OutputError(
            f"{out.parent} has {size_text(free)} free; the baked model needs about {size_text(need)}.",
            "free some space there, or write the output elsewhere with -o.",
        )


def _file_size_limit() -> int | None:
    """The process's file size limit in bytes (ulimit -f), None when there is none (or no way to ask)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return None if limit == resource.RLIM_INFINITY or limit < 0 else limit
    except (ImportError, OSError, ValueError):
        return None


def size_text(n: int) -> str:
    """A byte count as people read it: 0 bytes, 812 bytes, 4.1 kB, 356 MB, 1.53 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= 0.9995 * size:  # what rounds to 1 of the unit or more
            value = n / size
            return f"{value:.3g} {unit}" if value < 999.5 else f"{value:.0f} {unit}"
    return f"{n} byte{'' if n == 1 else 's'}"


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _out_of_space(exc: BaseException, out: Path) -> int | None:
    """The errno when a writer's failure is the file system's lack of room (full, over quota, or a file over the
    size limit): an OSError saying so, a writer's own error type quoting it, or any failure of the writers (torch's
    and safetensors' raise their own types) while the output's file system is (nearly) full. None otherwise."""
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
        return exc.errno
    # safetensors' writer says the system's error in its message only: "I/O error: File too large (os error 27)".
    said = re.search(r"\(os error (\d+)\)", str(exc))
    if said and int(said.group(1)) in _NO_ROOM:
        return int(said.group(1))
    try:
        return errno.ENOSPC if shutil.disk_usage(out.parent).free < (16 << 20) else None
    except OSError:
        return None


def _write_pickle(model: nn.Module, tmp: Path, out: Path) -> None:
    from .ptzip import save_module

    try:
        save_module(model, tmp)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise OutputError(
            f"the baked model cannot be pickled whole ({type(exc).__name__}: {first_line(exc)}).",
            f"write a state dict instead: -o {out.with_suffix('.safetensors')}.",
        ) from None


def _write_safetensors(model: nn.Module, tmp: Path, bake_report, fold_report) -> None:
    from safetensors.torch import save_file

    seen: dict[tuple[int, int], str] = {}
    tensors = {}
    for key, t in model.state_dict().items():
        # safetensors refuses shared storage (tied weights): store a copy of each alias.
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        t = t.detach()
        tensors[key] = t.clone().contiguous() if ident in seen or not t.is_contiguous() else t
        seen[ident] = key
    meta = {MANIFEST_KEY: json.dumps(manifest(bake_report, fold_report, tensors))}
    # A key no architecture has: loading the file strictly into the original (unbaked) model fails at once,
    # instead of standardizing the already standardized weights a second time.
    tensors[BAKED_MARKER] = torch.ones(())
    save_file(tensors, str(tmp), metadata=meta)


# aten ops that take a weight: in a baked program each one's weight is a parameter or constant, never computed.
_WEIGHT_OPS = (
    "convolution",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "linear",
)


def exported_program(
    model: nn.Module,
    input_shapes: Sequence[tuple[int, ...]] | None,
    input_dtypes,
    dynamic_batch: bool,
    dynamic_hw: bool,
):
    """The baked model as a torch.export ExportedProgram, audited: every conv/linear weight is a stored tensor."""
    from ..onnx.trace import resolve_input_shapes, trace_inputs

    shapes = resolve_input_shapes(model, input_shapes)
    traced = trace_inputs(model, shapes, input_dtypes, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw)
    dim = torch.export.Dim.DYNAMIC
    specs = []
    for x in traced.args:
        spec = {0: dim} if dynamic_batch and x.ndim else {}
        if dynamic_hw:
            spec.update({d: dim for d in range(2, x.ndim)})
        specs.append(spec or None)
    try:
        program = torch.export.export(traced.model, traced.args, dynamic_shapes=tuple(specs), strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export refuses many kinds of model code
        raise OutputError(
            f"torch.export cannot capture the baked model ({type(exc).__name__}: {first_line(exc)}).",
            "write .safetensors or .pt instead, or try without --dynamic-hw.",
        ) from None
    stored = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name != "USER_INPUT"}
    for node in program.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op == "call_function" and name in _WEIGHT_OPS and len(node.args) > 1:
            weight = node.args[1]
            if getattr(weight, "name", None) not in stored:
                raise OutputError(
                    f"the exported program computes the weight of {node.name} ({weight}); a layer is left unbaked.",
                    "run `wsfold inspect` on SOURCE: unsupported layers stay as they are.",
                )
    return program
