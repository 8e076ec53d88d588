"""Export a (baked) model to ONNX with every weight an initializer, audited, checked and written atomically.

The steps, each one job: trace inputs (a private copy of the model at the export dtype, in eval mode, with
static TF-SAME pads frozen) -> raw export by torch.onnx -> graph passes and audit -> stamp metadata -> checked
save (onnx.checker, then rename into place).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__
from .errors import ExportError, OptionError, OutputError, brief, first_line
from .inputs import (
    ValueRange,
    check_names,
    forward_input_names,
    parse_dtype,
    parse_float_dtype,
    parse_shape,
    per_input,
    random_tensor,
)
from .modeltree import copy_paths, model_dtype, require_module, set_eval, structural_copy
from .paths import check_output, temp_folder

if TYPE_CHECKING:
    import onnx

    from .bake import BakeReport
    from .fold import FoldReport
    from .pipeline import Prepared

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


def declared_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The input size a model declares (timm pretrained_cfg/default_cfg, transformers config), batch 1."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return (1, *(int(v) for v in cfg["input_size"]))
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if size and channels:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (1, int(channels), int(h), int(w))
    return None


def resolve_input_shapes(model: nn.Module, shapes: Sequence[str | tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    if shapes and any(isinstance(s, int) for s in shapes):
        raise TypeError(f"input_shapes is a list of shapes, one per input, such as [{tuple(shapes)}]")
    if shapes:
        return [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]
    captured = getattr(model, "wsfold_input_shapes", None)  # a .pt2 program's, as it was captured
    if captured:
        return [tuple(s) for s in captured]
    declared = declared_input_shape(model)
    if declared is None:
        raise OptionError(
            "the model does not declare its input size.",
            "pass --input-shape, e.g. --input-shape 1,3,224,224 (repeat it for several inputs).",
        )
    return [declared]


def flatten_outputs(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Output names and tensors in the order an exporter flattens them."""
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if isinstance(out, dict):
        names, tensors = [], []
        for k, v in out.items():
            sub_names, sub = flatten_outputs(v)
            names += [str(k) if len(sub) == 1 else f"{k}_{n}" for n in sub_names]
            tensors += sub
        return names, tensors
    if isinstance(out, (tuple, list)):
        names, tensors = [], []
        for v in out:
            _, sub = flatten_outputs(v)
            names += [f"output_{len(tensors) + j}" for j in range(len(sub))]
            tensors += sub
        return names, tensors
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return flatten_outputs(dict(out))
    raise ExportError(
        f"the model returns a {type(out).__name__}; wsfold exports tensors, tuples and dicts of tensors.",
        "wrap the model so that forward returns tensors only.",
    )


def freeze_same_pads(model: nn.Module, args: tuple[torch.Tensor, ...]) -> nn.Module:
    """With static spatial dims, TF-SAME padding is a constant: replace each SamePad by the torch.nn pad it
    amounts to at this input size (the exported graph then has no shape arithmetic). Returns a copy."""
    from .modules import SamePad, tf_same_pad

    names = [n for n, m in model.named_modules() if isinstance(m, SamePad)]
    if not names:
        return model
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda mod, inp, n=n: sizes.__setitem__(n, tuple(inp[0].shape))
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    frozen = copy_paths(model, set(sizes))
    pad_cls = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}
    for name, shape in sizes.items():
        m = model.get_submodule(name)
        nd = len(m.kernel_size)
        pads = tf_same_pad(shape[-nd:], m.kernel_size, m.stride, m.dilation)
        parent, _, leaf = name.rpartition(".")
        setattr(frozen.get_submodule(parent) if parent else frozen, leaf, pad_cls[nd](pads, m.value))
    return frozen


class _Modeless(nn.Module):
    """Holds a torch.export program's module, which refuses train()/eval() (the TorchScript exporter calls
    them): only this wrapper's own flag changes."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> _Modeless:
        self.training = mode
        return self

    def forward(self, *args):
        return self.module(*args)


def _refuses_modes(model: nn.Module) -> bool:
    try:
        model.train(model.training)
    except NotImplementedError:
        return True
    return False


@dataclass
class TraceInputs:
    """What the exporter is handed: a private copy of the model (export dtype, eval mode, static pads frozen),
    example inputs, and the graph's input and output names."""

    model: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    notes: list[str] = field(default_factory=list)
    # The precision the weights were rounded to (export --dtype; bfloat16 is written as float32), when recorded.
    weights_dtype: torch.dtype | None = None

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def export_dtype(model: nn.Module, dtype: torch.dtype | str | None, notes: list[str]) -> torch.dtype:
    """The floating dtype the graph computes in: ``dtype`` if given, else the model's (bfloat16 widens to float32:
    ONNX Conv has no bfloat16, and widening the baked weights is exact)."""
    if dtype is not None:
        dtype = parse_float_dtype(dtype)
    else:
        dtype = model_dtype(model)
    if dtype == torch.bfloat16:
        notes.append("bfloat16 model exported as float32 (ONNX Conv has no bfloat16; the weights widen exactly)")
        dtype = torch.float32
    return dtype


def trace_inputs(
    model: nn.Module,
    input_shapes: list[tuple[int, ...]],
    input_dtypes: Sequence[torch.dtype | str | None] | torch.dtype | str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    input_names: Sequence[str] | None = None,
    value_ranges: Sequence[ValueRange | None] | None = None,
    dynamic_batch: bool,
    dynamic_hw: bool,
) -> TraceInputs:
    """Prepare the model and example inputs for the exporter without changing ``model``: a structural copy that
    shares its tensors, or holds converted ones when the export ``dtype`` differs. Floating inputs default to
    the export dtype; integer and bool inputs keep theirs."""
    notes: list[str] = []
    dtype = export_dtype(model, dtype, notes)
    private = set_eval(structural_copy(model, dtype if dtype != model_dtype(model) else None))
    if _refuses_modes(private):
        private = _Modeless(private)
    count = len(input_shapes)
    if isinstance(input_dtypes, (str, torch.dtype)):
        input_dtypes = [input_dtypes]
    kinds = [parse_dtype(d) if d is not None else dtype for d in per_input(input_dtypes, count, "--input-dtype")]
    ranges = per_input(value_ranges, count, "--input-range")
    trace_batch = 2 if dynamic_batch and input_shapes[0][0] == 1 else None
    gen = torch.Generator().manual_seed(0)
    try:
        args = tuple(
            random_tensor((trace_batch, *s[1:]) if trace_batch else s, kind, gen, rng)
            for s, kind, rng in zip(input_shapes, kinds, ranges)
        )
    except (MemoryError, RuntimeError) as exc:
        raise OptionError(
            f"example inputs of shape {', '.join(map(str, input_shapes))} cannot be made ({first_line(exc)}).",
            "use a smaller --input-shape.",
        ) from None
    with torch.no_grad():
        try:
            if not dynamic_hw:
                private = freeze_same_pads(private, args)
            reference = private(*args)
        except Exception as exc:  # noqa: BLE001 - the user's shapes may not fit the model
            given = ", ".join(f"{tuple(s)} {str(k).removeprefix('torch.')}" for s, k in zip(input_shapes, kinds))
            raise OptionError(
                f"the model cannot run on inputs {given} ({type(exc).__name__}: {first_line(exc)}).",
                "fix --input-shape / --input-dtype (one per input, in forward's order).",
            ) from None
    if dynamic_hw:
        _require_another_size(private, args, kinds, ranges, gen)
    output_names, _ = flatten_outputs(reference)
    names = check_names(input_names, count) if input_names else forward_input_names(model, count)
    clash = sorted(set(names) & set(output_names))
    if clash:
        raise OptionError(
            f"input name {clash[0]!r} is also the name of an output.", "choose another name with --input-name."
        )
    weights = model_dtype(model)
    return TraceInputs(private, args, names, output_names, notes, weights if weights != dtype else None)


def _require_another_size(model: nn.Module, args, kinds, ranges, gen: torch.Generator) -> None:
    """--dynamic-hw only for a model that runs at another spatial size: one that fixes its size (a position
    embedding of fixed length) would keep the exporter's shape solver busy for minutes before it refused. A U-Net
    takes multiples of its downsampling only, so a few growths are tried."""
    spatial = [a.ndim >= 3 for a in args]
    if not any(spatial):
        return
    largest = max(max(a.shape[2:]) for a, s in zip(args, spatial) if s)
    for grow in dict.fromkeys([1, 2, 4, 8, 16, 32, largest]):
        grown = tuple(
            random_tensor((*a.shape[:2], *(d + grow for d in a.shape[2:])), kind, gen, rng) if s else a
            for a, s, kind, rng in zip(args, spatial, kinds, ranges)
        )
        try:
            with torch.no_grad():
                model(*grown)
        except Exception:  # noqa: BLE001 - the model refuses that size: try the next
            continue
        return
    sizes = ", ".join("x".join(map(str, a.shape[2:])) for a, s in zip(args, spatial) if s)
    raise OptionError(
        f"--dynamic-hw: the model has fixed spatial sizes (it runs at {sizes} only, and refused every size from 1 "
        f"to {largest} larger).",
        "export without --dynamic-hw.",
    )


@contextlib.contextmanager
def _exporter_errors(exporter: str):
    """torch.onnx refusing the model (an op ONNX lacks, control flow it cannot capture) is about the model; a full
    disk or a refused write is the machine's (left for the CLI to say so)."""
    from .errors import ENVIRONMENT_ERRNOS

    try:
        yield
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except OSError as exc:
        if exc.errno in ENVIRONMENT_ERRNOS:
            raise
        raise _model_refused(exporter, exc) from None
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types
        raise _model_refused(exporter, exc) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _model_refused(exporter: str, exc: BaseException) -> ExportError:
    """The exporter's own wrapper ("Failed to export the model with torch.export ...") says where, its cause says
    why (data-dependent control flow, an unsupported op): name the innermost one."""
    cause = exc
    while cause.__cause__ is not None and cause.__cause__ is not cause:
        cause = cause.__cause__
    text = brief(_ANSI.sub("", first_line(cause)), 300)
    other = "dynamo" if exporter == "torchscript" else "torchscript"
    return ExportError(
        f"torch.onnx ({exporter}) cannot export the model: {type(cause).__name__}: {text}.",
        f"try --exporter {other}, or change the model code it names.",
    )


@contextlib.contextmanager
def _quiet_exporter(notes: list[str]):
    """torch.onnx prints progress to stdout and warns a lot; keep stdout for our own (JSON) output. Tracer
    warnings raised in the model's own code (not torch's) are kept as notes: a traced branch may be wrong."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    torch_dir = str(Path(torch.__file__).parent)
    try:
        # torch.export prints the graph it could not capture to stderr; the error says what went wrong.
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("always")
            yield sink
        for w in caught:
            if issubclass(w.category, torch.jit.TracerWarning) and not str(w.filename).startswith(torch_dir):
                note = (
                    f"tracer warning at {Path(w.filename).name}:{w.lineno}: {str(w.message).split('.')[0]}; run verify"
                )
                if note not in notes:
                    notes.append(note)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_REGISTRIES: dict[Any, Any] = {}


@contextlib.contextmanager
def _registry_built_once():
    """The dynamo exporter rebuilds its table of ONNX translations on every call: onnxscript re-parses the source
    of ~500 torchlib functions, about 1 s each time on the project's machine. Within our own export calls, build
    it once per opset and process (the table is only read: wsfold registers no custom translations). If torch no
    longer has this hook, nothing changes but the time."""
    try:
        from torch.onnx._internal.exporter import _registration

        owner = _registration.ONNXRegistry
        original = owner.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    owner.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        owner.from_torchlib = original


def _raw_export(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    exporter: str,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    dynamic_hw: bool,
) -> None:
    """torch.onnx.export to ``path``. The dynamo exporter writes the weights to ``path``.data as it goes (never
    a second copy of them in memory); the TorchScript one writes one file (external data only above 2 GB)."""
    if exporter == "torchscript":
        axes: dict[str, dict[int, str]] = {}
        for name, x in zip(input_names, args):
            dims = {0: "batch"} if dynamic_batch else {}
            if dynamic_hw:
                dims.update({d: f"{name}_dim{d}" for d in range(2, x.ndim)})
            if dims:
                axes[name] = dims
        if dynamic_batch:
            axes.update({name: {0: "batch"} for name in output_names})
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes or None,
            do_constant_folding=True,
        )
        return
    dim = torch.export.Dim
    batch = dim("batch") if dynamic_batch else None
    shapes = []
    for i, x in enumerate(args):
        spec: dict[int, Any] = {0: batch} if batch is not None else {}
        if dynamic_hw:
            spec.update({d: dim(f"in{i}_d{d}") for d in range(2, x.ndim)})
        shapes.append(spec or None)
    # A wrapped program module takes ``*args``: torch.export matches that parameter as one tuple.
    dynamic = (tuple(shapes),) if isinstance(model, _Modeless) else tuple(shapes)
    with _registry_built_once():
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic,
            external_data=True,
            optimize=True,
            verbose=False,
        )


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
    from .onnx_graph import (
        audit_graph,
        dedupe_initializers,
        drop_unused_initializers,
        fold_constant_nodes,
        fold_constants,
        guard_pad_maxpool,
    )

    if fold:
        proto = fold_constants(proto)
    # Whatever computes on constants alone is evaluated here, one node at a time (with either exporter, folded
    # by onnxscript or not): the written graph computes nothing that could have been a constant.
    fold_constant_nodes(proto, base_dir)
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

    from .onnx_graph import fold_constants
    from .onnx_store import is_external, write_external

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
    from .onnx_graph import _all_nodes

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

    from .onnx_store import write_external, write_single
    from .paths import file_mode, place, signals_held

    base_dir = base_dir or workdir
    staged = base_dir / ".checked.onnx"
    onnx.save_model(proto, str(staged))  # small: the weights stay where they are
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except onnx.checker.ValidationError as exc:
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


def _has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def provenance(
    bake_report: BakeReport | None, fold_report: FoldReport | None, source: Path | None, baked: int | None = None
) -> dict[str, str]:
    """The metadata wsfold stamps on a graph: what was baked and folded, from which file. verify reads
    ``wsfold_fold`` to compare per layer against the same folding."""
    from .load import file_sha256

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

    from .pipeline import Prepared

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
        with _quiet_exporter(notes), _exporter_errors(exporter):
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
