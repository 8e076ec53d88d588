"""Typer app: each command parses options, calls the core, and renders; no logic of its own."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import EXIT_VERIFY_FAILED, handle_errors
from .progress import progress_stages, wants_progress

app = typer.Typer(
    name="wsfold",
    help="Bake weight-standardized layers into plain convolutions, export constant-weight ONNX, verify it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"wsfold {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print wsfold's version and exit.")
    ] = False,
) -> None:
    """Bake weight-standardized layers into plain convolutions, export constant-weight ONNX, verify it."""


Source = Annotated[
    Path,
    typer.Argument(
        help=(
            "Checkpoint: .pt/.pth/.bin (state dict or training checkpoint), .safetensors, a model directory "
            "(transformers' save_pretrained, timm's save_for_hf), or a .pt2 torch.export program "
            "(needs --allow-pickle)."
        ),
        show_default=False,
    ),
]
Arch = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture for a state dict: package.module:callable or path/to/file.py:callable."),
]
ArchKwargs = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch.")]
StateKey = Annotated[
    str | None,
    typer.Option("--state-key", help="Key of the state dict inside a training checkpoint (dotted for nesting)."),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow loading a whole pickled nn.Module (runs code from the file: only for files you trust).",
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")]
ShowProgress = Annotated[
    bool, typer.Option("--progress", help="Show progress bars even when stderr is not a terminal.")
]
AllowNonfinite = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        help="Bake layers whose weight holds NaN or inf as they are (refused otherwise: the model computes NaN).",
    ),
]
NoFold = Annotated[
    bool, typer.Option("--no-fold", help="Do not fold inference-static normalizers into the baked layers.")
]


def _stdout():
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits 1 here, the code that says "verification failed": let handle_errors say 141 instead.
            self.quiet = True
            raise BrokenPipeError

    # Not a terminal (a file, a pipe, CI's log): nothing to fit, so no column is cut or folded to 80 characters.
    width = None if sys.stdout.isatty() else 1000
    return _Console(soft_wrap=False, width=width)


def _finite(value: Any) -> Any:
    """NaN and infinities as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _running(json_output: bool, quiet: bool, progress: bool):
    """What every command runs its core call under: stdout kept for --json, progress bars where wanted."""
    with (
        _stdout_for(json_output),
        progress_stages(wants_progress(json_output=json_output, quiet=quiet, forced=progress)) as stages,
    ):
        yield stages


def _input_options(input_shape, input_dtype, dtype):
    """--input-shape, --input-dtype and --dtype, parsed: (shapes, input dtypes, cast dtype), None where not given."""
    from ..inputs import parse_dtype, parse_float_dtype, parse_shape

    shapes = [parse_shape(s) for s in input_shape] if input_shape else None
    input_dtypes = [parse_dtype(d) for d in input_dtype] if input_dtype else None
    return shapes, input_dtypes, parse_float_dtype(dtype) if dtype else None


@contextlib.contextmanager
def _stdout_for(json_output: bool):
    """With --json, stdout holds the one JSON object: anything else printed meanwhile (the model's own code,
    a library) goes to stderr."""
    if not json_output:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _prepare(
    source: Path,
    arch,
    arch_kwargs,
    state_key,
    allow_pickle,
    stages,
    *,
    fold=True,
    keep_original=False,
    allow_nonfinite=False,
    dtype=None,
):
    from ..pipeline import prepare

    return prepare(
        source,
        arch=arch,
        arch_kwargs=arch_kwargs,
        state_key=state_key,
        allow_pickle=allow_pickle,
        fold=fold,
        keep_original=keep_original,
        allow_nonfinite=allow_nonfinite,
        dtype=dtype,
        progress=stages.reporter(),
    )


def _arch_file(arch: str | None) -> Path | None:
    """The file an --arch path/to/file.py:callable names (an input that no output may replace)."""
    target = (arch or "").rpartition(":")[0]
    return Path(target) if target.endswith(".py") else None


@app.command()
@handle_errors
def inspect(
    source: Source,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    state_key: StateKey = None,
    allow_pickle: AllowPickle = False,
    no_fold: NoFold = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
    progress: ShowProgress = False,
) -> None:
    """List the weight-standardized (derived-weight) layers of SOURCE, their formula and eps, and what would fold.
    Writes nothing."""
    from . import render

    with _running(json_output, quiet, progress) as stages:
        prepared = _prepare(
            source, arch, arch_kwargs, state_key, allow_pickle, stages, fold=not no_fold, allow_nonfinite=True
        )
    if json_output:
        _emit_json(prepared.to_dict())
    elif not quiet:
        console = _stdout()
        render.notes(console, prepared.notes)
        render.detection(console, source, prepared.detection)
        render.folding(console, prepared.fold, would=True)


@app.command()
@handle_errors
def bake(
    source: Source,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output: .safetensors (state dict + checked manifest; loads with wsfold.load_baked), .pt2 "
            "(torch.export program; loads with torch alone) or .pt (pickled module). "
            "Default: SOURCE's stem + .baked.safetensors beside it.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists (never SOURCE).")] = False,
    fsync: Annotated[
        bool,
        typer.Option(
            "--fsync",
            help="Flush OUTPUT to disk before moving it into place, so that it survives a power loss too "
            "(waits for the disk). Off by default: OUTPUT is still never seen half-written.",
        ),
    ] = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    state_key: StateKey = None,
    allow_pickle: AllowPickle = False,
    allow_nonfinite: AllowNonfinite = False,
    no_fold: NoFold = False,
    dtype: ExportDtype = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = None,
    static_batch: StaticBatch = False,
    dynamic_hw: DynamicHW = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
    progress: ShowProgress = False,
) -> None:
    """Write a checkpoint whose weight-standardized layers are plain layers holding the exact standardized weights."""
    from ..artifacts.save import SUFFIXES, save_baked
    from ..errors import OptionError
    from ..io.paths import check_output
    from . import render

    # SOURCE's stem: v1 and v2 of "my.model.v1.pt" do not meet in one name (a model directory keeps its name).
    named = source.resolve() if source.is_dir() else source  # "." and ".." have no name of their own
    out = output or named.with_name(f"{named.name if source.is_dir() else named.stem}.baked.safetensors")
    check_output(out, force=force, source=source, inputs=[_arch_file(arch)], suffixes=SUFFIXES)
    graph_only = {"--input-shape": input_shape, "--input-dtype": input_dtype, "--static-batch": static_batch}
    graph_only["--dynamic-hw"] = dynamic_hw
    given = [name for name, value in graph_only.items() if value]
    if given and out.suffix != ".pt2":
        named = " and ".join([", ".join(given[:-1]), given[-1]] if len(given) > 1 else given)
        raise OptionError(
            f"{named} only appl{'y' if len(given) > 1 else 'ies'} to a .pt2 output (a torch.export program); "
            f"writing {out.name} would ignore {'them' if len(given) > 1 else 'it'}.",
            f"drop {'them' if len(given) > 1 else 'it'}, or write -o {out.with_suffix('.pt2')}.",
        )
    shapes, input_dtypes, cast = _input_options(input_shape, input_dtype, dtype)
    with _running(json_output, quiet, progress) as stages:
        prepared = _prepare(
            source,
            arch,
            arch_kwargs,
            state_key,
            allow_pickle,
            stages,
            fold=not no_fold,
            allow_nonfinite=allow_nonfinite,
            dtype=cast,
        )
        stages.sequence()(f"write {out.name}")
        save_baked(
            prepared,
            out,
            force=force,
            input_shapes=shapes,
            input_dtypes=input_dtypes,
            dynamic_batch=not static_batch,
            dynamic_hw=dynamic_hw,
            fsync=fsync,
        )
    if json_output:
        _emit_json({**prepared.to_dict(), "output": str(out), "fsync": fsync})
    elif not quiet:
        console = _stdout()
        render.notes(console, prepared.notes)
        render.detection(console, source, prepared.detection)
        render.folding(console, prepared.fold, would=False)
        console.print(
            f"wrote {out} ({len(prepared.bake.baked)} layer(s) baked, {len(prepared.fold.folded)} normalizer(s) folded)"
        )


InputShape = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Input shape such as 1,3,224,224; repeat for several inputs. Default: the size the model declares.",
    ),
]
InputDtype = Annotated[
    list[str] | None,
    typer.Option(
        "--input-dtype",
        help="Dtype of each input, in forward's order (one value: all inputs): float32, float16, bfloat16, "
        "float64, int64, int32, bool. Default: the export dtype for every input.",
    ),
]
StaticBatch = Annotated[
    bool,
    typer.Option("--static-batch", help="Fix the batch dimension of the graph written (export's .onnx, bake's .pt2)."),
]
DynamicHW = Annotated[
    bool, typer.Option("--dynamic-hw", help="Make spatial dimensions dynamic too (export's .onnx, bake's .pt2).")
]
InputName = Annotated[
    list[str] | None,
    typer.Option("--input-name", help="Name of each graph input (repeat). Default: forward's parameter names."),
]
ExportDtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Cast the baked model to float16, bfloat16, float32 or float64 (weights computed in float64, rounded "
        "once). Default: the checkpoint's dtype.",
    ),
]


@app.command()
@handle_errors
def verify(
    source: Source,
    onnx_path: Annotated[Path, typer.Option("--onnx", help="The ONNX graph to check.", show_default=False)],
    samples: Annotated[
        int, typer.Option("--samples", help="Seeded random batches (each at batch 1 and 3 when dynamic).")
    ] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first random batch.")] = 0,
    inputs: Annotated[
        Path | None, typer.Option("--inputs", help="Real inputs: .npz keyed by input name, or .pt.")
    ] = None,
    input_shape: InputShape = None,
    input_range: Annotated[
        list[str] | None,
        typer.Option(
            "--input-range",
            help="LOW,HIGH for each input's random samples (repeat; one value: all inputs). Integers are drawn in "
            "[LOW, HIGH). Default: N(0,1) for floats, [0, 10) for integers.",
        ),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option("--atol", help="Use allclose(onnx, original, atol, rtol) instead of the default rule."),
    ] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Relative tolerance for the allclose rule.")] = None,
    per_layer: Annotated[
        bool,
        typer.Option(
            "--per-layer/--no-per-layer",
            help="Compare every baked initializer with the weight of the layer it came from (exact, cheap; on by "
            "default).",
        ),
    ] = True,
    ort_opt_level: Annotated[
        str, typer.Option("--ort-opt-level", help="onnxruntime graph optimizations: disable, basic, extended, all.")
    ] = "all",
    runtime: Annotated[
        list[str] | None,
        typer.Option(
            "--runtime",
            help="Runtime that runs the graph: onnxruntime or openvino (repeat for both; default onnxruntime). Each "
            "is judged by the same rule, at the precision it really computes in.",
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="Ask the runtimes to compute in f32, bf16 or f16 (OpenVINO: INFERENCE_PRECISION_HINT), read back "
            "to confirm. Default: each runtime's own choice on this machine.",
        ),
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the JSON report to this .json file.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --report file if it exists.")] = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    state_key: StateKey = None,
    allow_pickle: AllowPickle = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
    progress: ShowProgress = False,
) -> None:
    """Check with onnxruntime (and OpenVINO) that the ONNX graph computes what SOURCE computes. Exit 1 when not."""
    from ..inputs import parse_range, parse_shape
    from ..io.paths import atomic_path, check_output
    from ..verify.feeds import check_inputs_file
    from ..verify.runtimes import check_runtimes
    from ..verify.verification import check_onnx_file, verify_onnx
    from . import render

    shapes = [parse_shape(s) for s in input_shape] if input_shape else None
    ranges = [parse_range(r) for r in input_range] if input_range else None
    check_onnx_file(onnx_path)  # before SOURCE is loaded and probed: a wrong --onnx or --inputs is said at once
    check_runtimes(runtime or [], precision)
    if inputs is not None:
        check_inputs_file(inputs)
    if report is not None:
        data = onnx_path.with_name(f"{onnx_path.name}.data")
        check_output(
            report,
            force=force,
            source=source,
            inputs=[onnx_path, data, _arch_file(arch), inputs],
            suffixes=(".json",),
            option="--report",
        )
    with _running(json_output, quiet, progress) as stages:
        prepared = _prepare(
            source, arch, arch_kwargs, state_key, allow_pickle, stages, keep_original=True, allow_nonfinite=True
        )
        result = verify_onnx(
            prepared,
            onnx_path,
            samples=samples,
            seed=seed,
            input_shapes=shapes,
            inputs_file=inputs,
            atol=atol,
            rtol=rtol,
            ort_opt_level=ort_opt_level,
            per_layer=per_layer,
            value_ranges=ranges,
            runtimes=runtime,
            precision=precision,
            progress=stages.sequence(),
        )
    payload = {"source": str(source), "onnx": str(onnx_path), "notes": prepared.notes, **result.to_dict()}
    if report is not None:
        with atomic_path(report, force=force) as tmp:
            tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if json_output:
        _emit_json(payload)
    elif not quiet:
        console = _stdout()
        render.notes(console, prepared.notes)
        render.verification(console, result)
    if not result.passed:
        if quiet or json_output:
            print(f"wsfold: verification failed: {result.cause}.", file=sys.stderr)
        raise typer.Exit(EXIT_VERIFY_FAILED)


@app.command()
@handle_errors
def export(
    source: Source,
    onnx_path: Annotated[
        Path, typer.Option("--onnx", help="Where to write the ONNX graph (.onnx).", show_default=False)
    ],
    input_shape: InputShape = None,
    input_dtype: InputDtype = None,
    input_name: InputName = None,
    dtype: ExportDtype = None,
    static_batch: StaticBatch = False,
    dynamic_hw: DynamicHW = False,
    exporter: Annotated[
        str,
        typer.Option(
            "--exporter",
            help="dynamo (torch's supported exporter) or torchscript (faster, but deprecated by torch; see README).",
        ),
    ] = "dynamo",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 18,
    external_data: Annotated[
        bool, typer.Option("--external-data", help="Store weights in OUT.onnx.data (automatic above 1.8 GB).")
    ] = False,
    no_simplify: Annotated[
        bool, typer.Option("--no-simplify", help="Skip constant folding of the TorchScript export.")
    ] = False,
    no_fold: NoFold = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the ONNX file if it exists.")] = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    state_key: StateKey = None,
    allow_pickle: AllowPickle = False,
    allow_nonfinite: AllowNonfinite = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
    progress: ShowProgress = False,
) -> None:
    """Bake SOURCE in memory (if needed) and write an ONNX graph whose every weight is a constant."""
    from ..io.paths import check_output
    from ..onnx.export import export_onnx

    inputs = [_arch_file(arch)]
    check_output(onnx_path, force=force, source=source, inputs=inputs, suffixes=(".onnx",), option="--onnx")
    if external_data:
        data = onnx_path.with_name(f"{onnx_path.name}.data")
        check_output(data, force=force, source=source, inputs=inputs, option="--onnx (its external data file)")
    shapes, input_dtypes, model_dtype = _input_options(input_shape, input_dtype, dtype)
    with _running(json_output, quiet, progress) as stages:
        prepared = _prepare(
            source,
            arch,
            arch_kwargs,
            state_key,
            allow_pickle,
            stages,
            fold=not no_fold,
            allow_nonfinite=allow_nonfinite,
            dtype=model_dtype,
        )
        result = export_onnx(
            prepared,
            onnx_path,
            input_shapes=shapes,
            input_dtypes=input_dtypes,
            dtype=model_dtype,
            input_names=input_name,
            dynamic_batch=not static_batch,
            dynamic_hw=dynamic_hw,
            exporter=exporter,
            opset=opset,
            external_data=True if external_data else None,
            simplify=not no_simplify,
            force=force,
            progress=stages.sequence(),
        )
    if json_output:
        _emit_json({**result.to_dict(), **prepared.to_dict()})
    elif not quiet:
        from . import render

        console = _stdout()
        render.notes(console, prepared.notes)
        render.skipped(console, prepared.detection)
        console.print(
            f"wrote {result.output}: {result.nodes} nodes, {result.initializers} initializers, opset {result.opset}, "
            f"{result.exporter} exporter, {result.baked} layer(s) baked, {len(prepared.fold.folded)} folded"
            + (", weights in " + result.output.name + ".data" if result.external_data else ""),
            highlight=False,
        )
        for note in result.notes:
            console.print(f"note: {note}", highlight=False)
        if result.pad_guards:
            console.print(
                f"note: {len(result.pad_guards)} Pad(0)+MaxPool pair(s) written with pad value -0.0 so that "
                "onnxruntime does not fuse them into a -inf-padded MaxPool",
                highlight=False,
            )
