"""`wsfold quantize`: a static int8 graph with a verdict (the command; the work is wsfold.quantize's)."""

from __future__ import annotations

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


@handle_errors
def quantize(
    source: Source,
    calibration: Annotated[
        Path,
        typer.Option(
            "--calibration",
            help="Calibration samples: .npz keyed by input name (one array for a one-input model) or .pt, "
            "preprocessed as the model takes them, samples along axis 0; or a folder of PNG/JPEG images.",
            show_default=False,
        ),
    ],
    onnx_path: Annotated[
        Path, typer.Option("--onnx", help="Where to write the int8 ONNX graph (.onnx).", show_default=False)
    ],
    holdout: Annotated[
        Path | None,
        typer.Option(
            "--holdout", help="Samples to judge the int8 graph on (same format). Default: the last 20% of CAL."
        ),
    ] = None,
    calibrate_method: Annotated[
        str,
        typer.Option(
            "--calibrate-method",
            help="minmax (memory independent of the number of samples), percentile or entropy (both keep every "
            "intermediate activation of every sample until the end).",
        ),
    ] = "minmax",
    min_sqnr: MinSqnr = 20.0,
    min_agreement: MinAgreement = 0.97,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Keep this conv/linear layer in float (repeat).")
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help="For a folder of images: H,W the images are cropped to (the shorter side resized to it first). "
            "Default: the model's declared preprocessing (timm pretrained_cfg, preprocessor_config.json).",
        ),
    ] = None,
    mean: Annotated[
        str | None, typer.Option("--mean", help="For images: per-channel mean after scaling to [0,1].")
    ] = None,
    std: Annotated[
        str | None, typer.Option("--std", help="For images: per-channel std after scaling to [0,1].")
    ] = None,
    keep_failing: Annotated[
        bool, typer.Option("--keep-failing", help="Write OUT even when the verdict fails (still exit 1).")
    ] = False,
    input_shape: InputShape = None,
    input_dtype: InputDtype = None,
    input_name: InputName = None,
    static_batch: StaticBatch = False,
    dynamic_hw: DynamicHW = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset of the float graph.")] = 18,
    external_data: Annotated[
        bool, typer.Option("--external-data", help="Export the float graph with its weights in a .data file.")
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
    """Bake, export and quantize SOURCE to a static int8 QDQ graph, judged on held-out data. Exit 1 when it
    loses more accuracy than the thresholds allow (OUT is then not written unless --keep-failing)."""
    from ..errors import OptionError
    from ..io.paths import check_output
    from ..quantize.images import explicit_preprocess
    from ..quantize.int8 import quantize_onnx
    from ..quantize.verdict import _check_thresholds, failure_line

    _check_thresholds(min_sqnr, min_agreement, calibrate_method)
    preprocess = explicit_preprocess(image_size, mean, std)
    if preprocess is not None and not calibration.is_dir():
        raise OptionError(
            "--image-size, --mean and --std apply to a folder of images; --calibration is a file of inputs, which "
            "are taken as they are.",
            "drop them, or pass a folder of images.",
        )
    inputs = [_arch_file(arch), calibration, holdout]
    check_output(onnx_path, force=force, source=source, inputs=inputs, suffixes=(".onnx",), option="--onnx")
    shapes, input_dtypes, _ = _input_options(input_shape, input_dtype, None)
    with _running(json_output, quiet, progress) as stages:
        prepared = _prepare(
            source, arch, arch_kwargs, state_key, allow_pickle, stages, fold=not no_fold,
            allow_nonfinite=allow_nonfinite, keep_original=False,
        )  # fmt: skip
        result = quantize_onnx(
            prepared,
            onnx_path,
            calibration,
            holdout=holdout,
            method=calibrate_method,
            min_sqnr=min_sqnr,
            min_agreement=min_agreement,
            exclude=exclude or (),
            keep_failing=keep_failing,
            force=force,
            preprocess=preprocess,
            export_options={
                "input_shapes": shapes,
                "input_dtypes": input_dtypes,
                "input_names": input_name,
                "dynamic_batch": not static_batch,
                "dynamic_hw": dynamic_hw,
                "opset": opset,
                "external_data": True if external_data else None,
            },
            progress=stages.sequence(),
        )
    if json_output:
        _emit_json({"source": str(source), **result.to_dict()})
    elif not quiet:
        from . import render

        render.int8(_stdout(), result.verdict, result)
    if not result.verdict.passed:
        if quiet or json_output:
            print(f"wsfold: {failure_line(result.verdict)}.", file=sys.stderr)
        raise typer.Exit(EXIT_VERIFY_FAILED)
