"""Export a (baked) model to ONNX with every weight an initializer, audited, checked and written atomically.

The steps, each one job: trace inputs (a private copy of the model at the export dtype, in eval mode, with
static TF-SAME pads frozen) -> raw export by torch.onnx -> graph passes and audit -> stamp metadata -> checked
save (onnx.checker, then rename into place).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import __version__
from ..bake.modeltree import model_dtype, require_module
from ..errors import ExportError, OptionError, OutputError, first_line
from ..io.memory import released_while_running
from ..io.paths import check_output, temp_folder

if TYPE_CHECKING:
    import onnx

    from ..bake.baker import BakeReport
    from ..bake.fold import FoldReport
    from ..pipeline import Prepared
from .torch_export import _exporter_errors, _quiet_exporter, _raw_export
from .trace import _has_convolutions, resolve_input_shapes, trace_inputs

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "dynamo"
DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole file


@dataclass
class ExportResult:
    """What was written and what was done to the graph."""

    output: Path
    nodes: int
    initializers: int
    external_data: bool
    baked: int
    opset: int
    exporter: str
    input_names: list[str]
    input_shapes: list[tuple[int, ...]]
    output_names: list[str]
    dynamic_batch: bool
    dynamic_hw: bool
    pad_guards: list[str] = field(default_factory=list)
    deduplicated: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "nodes": self.nodes,
            "initializers": self.initializers,
            "external_data": self.external_data,
            "baked": self.baked,
            "opset": self.opset,
            "exporter": self.exporter,
            "inputs": [{"name": n, "shape": list(s)} for n, s in zip(self.input_names, self.input_shapes)],
            "outputs": self.output_names,
            "dynamic_batch": self.dynamic_batch,
            "dynamic_hw": self.dynamic_hw,
            "pad_maxpool_guarded": self.pad_guards,
            "deduplicated_initializers": self.deduplicated,
            "notes": self.notes,
        }


@dataclass
class GraphPasses:
    """The rewritten graph and what the passes changed."""

    model: onnx.ModelProto
    deduplicated: int
    pad_guards: list[str]


def rewrite_and_audit(proto: onnx.ModelProto, *, fold: bool, base_dir: Path | None = None) -> GraphPasses:
    """onnxscript's constant folding (``fold``), then every constant-only node evaluated, de-duplication, the
    Pad(0)+MaxPool guard and dead initializers, then the audit: a graph that still computes a weight, or anything
    from constants alone, is refused. External initializers are read from ``base_dir`` when a pass needs them."""
    from .graph import (
        audit_graph,
        dedupe_initializers,
        drop_unused_initializers,
        fold_constant_nodes,
        fold_constants,
        guard_pad_maxpool,
    )
    from .simplify import (
        drop_identity_arithmetic,
        drop_no_ops,
        fold_known_shapes,
        fold_static_shapes,
        fuse_pad_into_conv,
        merge_unsqueezes,
    )

    if fold:
        proto = fold_constants(proto)
    # Whatever computes on constants alone is evaluated here, one node at a time (with either exporter, folded
    # by onnxscript or not): the written graph computes nothing that could have been a constant.
    fold_constant_nodes(proto, base_dir)
    # Exact simplifications a simplifier would make: batch-independent shapes, identity arithmetic. A round's
    # constant Reshape targets let shape inference see further in the next, hence the rounds.
    for _ in range(8):
        changed = fold_known_shapes(proto)
        if changed:
            fold_constant_nodes(proto, base_dir)  # what computed on those shapes alone (a head size's Cast, Sqrt)
        # before the arithmetic: shape inference sees through a constant Reshape target, not through Shape(y)
        changed += fold_static_shapes(proto)
        if not changed:
            break
    drop_identity_arithmetic(proto, base_dir)
    merge_unsqueezes(proto)
    drop_no_ops(proto)
    fuse_pad_into_conv(proto, base_dir)
    strip_trace_metadata(proto)
    deduped = dedupe_initializers(proto, base_dir)
    guards = guard_pad_maxpool(proto, base_dir)
    drop_unused_initializers(proto)
    problems = audit_graph(proto)
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ExportError(
            "the exported graph is not constant where it must be: " + "; ".join(problems[:2]) + more + ".",
            "run `wsfold inspect` on SOURCE: unsupported layers stay as they are and cannot export as constants.",
        )
    return GraphPasses(proto, deduped, guards)


def _graph_with_weights_on_disk(raw_path: Path, *, fold: bool) -> onnx.ModelProto:
    """The exported graph as a proto whose initializers of 1 KiB or more point into a data file beside
    ``raw_path`` (the dynamo exporter wrote them there; a TorchScript graph's are moved there, after onnxscript's
    constant folding when ``fold``): the passes and the save read them one at a time."""
    import onnx

    from .graph import fold_constants
    from .store import is_external, write_external

    if not fold:
        proto = onnx.load(str(raw_path), load_external_data=False)
        if all(is_external(t) or len(t.raw_data) < 1024 for t in proto.graph.initializer):
            return proto
        del proto
    proto = onnx.load(str(raw_path), load_external_data=True)
    if fold:
        proto = fold_constants(proto)
    work = raw_path.parent
    write_external(proto, work, work / "weights.bin", location="weights.bin")
    return proto


def _require_dynamic_sizes(proto: onnx.ModelProto, source: Path | None) -> None:
    """--dynamic-hw asked for sizes the graph does not have: the model fixed them (a torch.export program saved
    with static sizes, a reshape to a constant size) and the exporter specialized the graph to the example."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 3 and any(d.dim_param for d in dims[2:]):
            return
    if source is not None and source.suffix == ".pt2":
        what = "SOURCE is a torch.export program saved with fixed spatial sizes"
    else:
        what = "the model fixes its spatial size: the exported graph has none that varies"
    raise ExportError(
        f"--dynamic-hw: {what}.", "export without --dynamic-hw, or from the checkpoint the .pt2 was baked from."
    )


def strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """Drop what the dynamo exporter records per node and value (Python stack traces with the build machine's
    absolute paths, fx node names, class hierarchies): a third of a small graph's bytes, and nothing a runtime
    reads. The model's own metadata (wsfold's provenance) is kept."""
    from .graph import _all_nodes

    for node in _all_nodes(proto.graph):
        del node.metadata_props[:]
    for values in (proto.graph.input, proto.graph.output, proto.graph.value_info, proto.graph.initializer):
        for value in values:
            del value.metadata_props[:]


def stamp_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def checked_save(
    proto: onnx.ModelProto,
    out: Path,
    workdir: Path,
    *,
    external: bool,
    force: bool,
    keep: Sequence[Path] = (),
    base_dir: Path | None = None,
) -> None:
    """Run onnx.checker's full check on the graph, write it into ``workdir`` (its weights streamed from
    ``base_dir``, where the proto's external initializers point, into OUT.data or into the one file), then move
    it onto ``out``: the data file first, the graph last, so OUT never points at missing data. A stale
    ``OUT.data`` beside a graph written without external data is removed with --force, unless it is one of the
    files in ``keep``."""
    import onnx

    from ..io.paths import file_mode, place, signals_held
    from .store import write_external, write_single

    base_dir = base_dir or workdir
    staged = base_dir / ".checked.onnx"
    onnx.save_model(proto, str(staged))  # small: the weights stay where they are
    try:
        _check(staged)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # An InferenceError: the exporter's graph contradicts itself (the TorchScript exporter writes Python's //
        # on a negative int as ONNX's truncating Div, so a size computed so differs from what torch traced).
        raise ExportError(
            f"onnx.checker rejects the exported graph: {first_line(exc)}",
            "try another --opset or --exporter, and report it if the default ones fail.",
        ) from None
    finally:
        staged.unlink()
    final = workdir / out.name
    data_name = f"{out.name}.data"
    if external:
        write_external(proto, base_dir, workdir / data_name, location=data_name)
        onnx.save_model(proto, str(final))
    else:
        try:
            write_single(proto, base_dir, final)
        except OverflowError as exc:
            raise ExportError(f"{out.name}: {exc}.", "export with --external-data.") from None
    data = out.with_name(data_name)
    for written in (workdir / data_name, final) if external else (final,):
        os.chmod(written, file_mode())
    with signals_held():  # the data file and the graph arrive together, or neither does
        if not force and (out.exists() or out.is_symlink()):
            raise OutputError(
                f"{out} already exists (it was written while wsfold was working).",
                "pass --force (force=True in Python) to replace it, or choose another path.",
            )
        if external:
            place(workdir / data_name, data, force=force)
        elif force and _is_file_or_link(data) and not any(_same(data, k) for k in keep):
            data.unlink()  # a stale data file of an earlier export; never a folder
        try:
            place(final, out, force=force)
        except OutputError:
            if external and not force:
                data.unlink()  # ours: placed a moment ago, and the graph it belongs to lost the race
            raise


def _check(path: Path) -> None:
    """onnx.checker's full check. Its shape inference runs without data propagation: a Resize whose sizes are
    half constant and half read off a shape (what the shape passes leave of F.interpolate(size=...)) has sizes of
    no known length to it, and it refuses a graph that onnxruntime runs. Such a graph passes when the structure
    checks and shape inference with data propagation, strict, finds every shape consistent."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.shape_inference.InferenceError:
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False)
        onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True, data_prop=True)


def _is_file_or_link(path: Path) -> bool:
    try:
        return path.is_symlink() or path.is_file()
    except OSError:  # OUT.onnx.data may be a name too long to exist (OUT.onnx itself is not)
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_opset(opset: int, exporter: str) -> None:
    """An opset both torch's exporter and the installed onnx can write."""
    import onnx
    from torch.onnx import _constants

    # Opset 11 made Pad's pads and value inputs; the Pad(0)+MaxPool guard writes the value as one.
    low = 18 if exporter == "dynamo" else 11
    high = min(onnx.defs.onnx_opset_version(), _constants.ONNX_MAX_OPSET)
    if exporter == "torchscript":
        high = min(high, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    if not low <= opset <= high:
        raise OptionError(
            f"--opset {opset} is outside what the {exporter} exporter writes ({low} to {high}).",
            f"use --opset {DEFAULT_OPSET}.",
        )


def provenance(
    bake_report: BakeReport | None, fold_report: FoldReport | None, source: Path | None, baked: int | None = None
) -> dict[str, str]:
    """The metadata wsfold stamps on a graph: what was baked and folded, from which file. verify reads
    ``wsfold_fold`` to compare per layer against the same folding."""
    from ..load.read import file_sha256

    props = {"wsfold_version": __version__}
    if baked is None and bake_report is not None:
        baked = len(bake_report.baked)
    if baked is not None:
        props["wsfold_baked_layers"] = str(baked)
    if fold_report is not None:
        props["wsfold_fold"] = "0" if fold_report.skipped else "1"
        props["wsfold_folded"] = json.dumps([f.to_dict() for f in fold_report.folded])
    if source is not None and Path(source).is_file():
        props["wsfold_source"] = Path(source).name
        props["wsfold_source_sha256"] = file_sha256(Path(source))
    return props


def export_onnx(
    model: nn.Module | Prepared,
    out: str | Path,
    *,
    input_shapes: Sequence[str | tuple[int, ...]] | None = None,
    input_dtypes: Sequence[torch.dtype | str | None] | torch.dtype | str | None = None,
    dtype: torch.dtype | str | None = None,
    input_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    exporter: str = DEFAULT_EXPORTER,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    simplify: bool = True,
    bake_report: BakeReport | None = None,
    fold_report: FoldReport | None = None,
    source: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a baked model (or the result of :func:`wsfold.prepare`, which brings its reports and source) to
    ``out``. ``model`` is not changed. ``input_shapes`` defaults to the size the model declares;
    ``external_data=None`` picks external data automatically above ~1.8 GB. The reports and source go into the
    graph's metadata."""

    from ..pipeline import Prepared

    baked_count = None
    if isinstance(model, Prepared):
        prepared = model
        model, bake_report, fold_report = prepared.model, prepared.bake, prepared.fold
        source, baked_count = source or prepared.source, prepared.baked_layers
    require_module(model, "export_onnx")
    source = Path(source) if source else None
    out = check_output(Path(out), force=force, source=source, suffixes=(".onnx",), option="--onnx")
    data_path = out.with_name(f"{out.name}.data")
    if external_data:
        check_output(data_path, force=force, source=source, option="--onnx (its external data file)")
    if exporter not in EXPORTERS:
        raise OptionError(
            f"--exporter {exporter!r} is not one of {', '.join(EXPORTERS)}.", "use --exporter torchscript or dynamo."
        )
    check_opset(opset, exporter)
    shapes = resolve_input_shapes(model, input_shapes)
    if dtype is None and model_dtype(model) == torch.float64 and _has_convolutions(model):
        raise OptionError(
            "the checkpoint is float64, and onnxruntime's CPU provider runs no float64 Conv: its graph could not "
            "be verified or deployed there.",
            "pass --dtype float32 (the weights are computed in float64 and rounded once), or --dtype float64 to "
            "write a float64 graph anyway.",
        )
    traced = trace_inputs(
        model,
        shapes,
        input_dtypes,
        dtype=dtype,
        input_names=input_names,
        dynamic_batch=dynamic_batch,
        dynamic_hw=dynamic_hw,
    )
    notes = traced.notes
    external = traced.weight_bytes() > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    if external and not external_data:
        check_output(data_path, force=force, source=source, option="--onnx (its external data file)")

    with temp_folder(out) as tmpdir:
        # The exporter's files go in a folder of their own (OUT's name may be anything, "exported.onnx" too).
        work = tmpdir / "work"
        work.mkdir()
        raw_path = work / "exported.onnx"
        if progress:
            progress(f"torch.onnx.export ({exporter})")
        # The dynamo exporter traces with fake tensors and then reads each weight once, to write it: a checkpoint
        # loaded with mmap is handed back as it goes rather than left resident whole (it writes none of them).
        pages = released_while_running(traced.model) if exporter == "dynamo" else contextlib.nullcontext()
        with _quiet_exporter(notes), _exporter_errors(exporter), pages:
            _raw_export(
                traced.model,
                traced.args,
                raw_path,
                exporter=exporter,
                opset=opset,
                input_names=traced.input_names,
                output_names=traced.output_names,
                dynamic_batch=dynamic_batch,
                dynamic_hw=dynamic_hw,
            )
        if progress:
            progress("audit and rewrite graph")
        proto = _graph_with_weights_on_disk(raw_path, fold=simplify and exporter == "torchscript")
        if dynamic_hw:
            _require_dynamic_sizes(proto, source)
        # The dynamo exporter already ran onnxscript's optimizer; the TorchScript one leaves constant subgraphs
        # (pad construction, shape arithmetic), folded above.
        passes = rewrite_and_audit(proto, fold=False, base_dir=work)
        proto = passes.model
        props = provenance(bake_report, fold_report, source, baked_count)
        props["wsfold_input_shapes"] = json.dumps([list(s) for s in shapes])
        if traced.weights_dtype is not None:
            props["wsfold_dtype"] = str(traced.weights_dtype).removeprefix("torch.")
        stamp_metadata(proto, props)
        if progress:
            progress("onnx.checker (full check)")
        nodes, initializers = len(proto.graph.node), len(proto.graph.initializer)
        guards, deduped = passes.pad_guards, passes.deduplicated
        del passes
        checked_save(
            proto, out, tmpdir, external=external, force=force, keep=[p for p in (source,) if p], base_dir=work
        )
        del proto
    return ExportResult(
        output=out,
        nodes=nodes,
        initializers=initializers,
        external_data=external,
        baked=baked_count if baked_count is not None else len(bake_report.baked) if bake_report else 0,
        opset=opset,
        exporter=exporter,
        input_names=traced.input_names,
        input_shapes=list(shapes),
        output_names=traced.output_names,
        dynamic_batch=dynamic_batch,
        dynamic_hw=dynamic_hw,
        pad_guards=guards,
        deduplicated=deduped,
        notes=notes,
    )
