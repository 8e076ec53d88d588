"""Typer app: each command parses options, calls the core, and renders; no logic of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    AllowNonfinite,
    AllowPickle,
    Arch,
    ArchKwargs,
    DynamicHW,
    ExportDtype,
    ForceOnnx,
    InputDtype,
    InputName,
    InputShape,
    JsonOut,
    MinAgreement,
    MinSqnr,
    NoFold,
    Quiet,
    ShowProgress,
    Source,
    StateKey,
    StaticBatch,
    _arch_file,
    _emit_json,
    _input_options,
    _prepare,
    _running,
    _stdout,
)
from .errors import EXIT_VERIFY_FAILED, handle_errors
from .quantize import quantize

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
    min_sqnr: MinSqnr = 20.0,
    min_agreement: MinAgreement = 0.97,
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
    from ..errors import OptionError
    from ..inputs import parse_range, parse_shape
    from ..io.paths import atomic_path, check_output
    from ..quantize.verdict import failure_line, is_qdq, verify_int8
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
    int8 = is_qdq(onnx_path)
    if int8 and (precision is not None or any(r != "onnxruntime" for r in runtime or [])):
        raise OptionError(
            f"{onnx_path} is an int8 QDQ graph, and its verdict runs on onnxruntime only in this version: "
            "--runtime/--precision would not be applied.",
            "drop --runtime and --precision for an int8 graph.",
        )
    if int8 and inputs is None:
        raise OptionError(
            f"{onnx_path} is an int8 QDQ graph: it is judged by SQNR and top-1 agreement on real data, not on "
            "random samples.",
            "pass the held-out samples with --inputs HOLDOUT.npz.",
        )
    with _running(json_output, quiet, progress) as stages:
        prepared = _prepare(
            source, arch, arch_kwargs, state_key, allow_pickle, stages, keep_original=not int8, allow_nonfinite=True
        )
        if int8:
            result = verify_int8(prepared, onnx_path, inputs, min_sqnr=min_sqnr, min_agreement=min_agreement)
        else:
            # The baked model is only read by the per-layer check, after the runtimes' sessions are gone: it bakes
            # again then, and the sessions get the memory (verify of a ResNetV2-50x2 peaked 0.39 GB higher).
            prepared.model = None
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
        (render.int8 if int8 else render.verification)(console, result)
    if not result.passed:
        if quiet or json_output:
            print(
                f"wsfold: {failure_line(result) if int8 else f'verification failed: {result.cause}'}.", file=sys.stderr
            )
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
            help="dynamo (torch's supported exporter) or torchscript (faster, but deprecated by torch; see "
            "docs/formats.md).",
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
    force: ForceOnnx = False,
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


app.command()(quantize)
