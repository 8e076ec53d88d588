"""wsfold export against what a user would otherwise run: torch.onnx.export of the unbaked model (both exporters),
and onnxsim and onnxslim applied to those exports (pip install -e '.[bench]'). Models are built in-process with
random init (no downloads); not part of the tests.

    .venv/bin/python benchmarks/export_bench.py [--models resnetv2_50,vit_hybrid,nfnet_f0,diffusion_unet]
                                                [--skip-variants] [--json build/export_bench.json]

Two tables:
- variants (ResNetV2-50 BiT): export time, session creation, latency, size, nodes and error of every way to export;
- models (each of --models, both exporters): nodes of wsfold's graph and of the unbaked export simplified by each
  tool, and wsfold's session creation and batch-1 latency as ratios against the better simplifier (the one with
  fewer nodes; below 1: wsfold's is smaller or faster). Medians of interleaved runs, in one process, dynamic batch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fixtures"))
from resnetv2 import resnetv2_50  # noqa: E402

torch.set_num_threads(2)

from wsfold.bake.baker import bake_model  # noqa: E402
from wsfold.onnx.export import export_onnx  # noqa: E402


def measure_all(
    paths: dict[str, Path], x: np.ndarray | dict[str, np.ndarray], rounds: int = 3, runs: int = 30
) -> dict[str, dict]:
    """Session creation and latency for every graph, interleaved round by round so that machine noise and
    ordering effects hit every variant alike. ``x``: the one input, or values by input position name
    (input_0, input_1, ...) for graphs of several inputs."""
    created: dict[str, list[float]] = {k: [] for k in paths}
    sessions = {}
    for _ in range(rounds):
        for key, path in paths.items():
            t = time.perf_counter()
            sessions[key] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            created[key].append(time.perf_counter() - t)
    values = list(x.values()) if isinstance(x, dict) else [x]
    feeds = {k: {i.name: v for i, v in zip(s.get_inputs(), values)} for k, s in sessions.items()}
    for key, sess in sessions.items():
        for _ in range(3):
            sess.run(None, feeds[key])
    latency: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(runs):
        for key, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds[key])
            latency[key].append(time.perf_counter() - t)
    rows = {}
    for key, path in paths.items():
        model = onnx.load(str(path), load_external_data=False)
        size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
        rows[key] = {
            "session_s": statistics.median(created[key]),
            "latency_ms": 1000 * statistics.median(latency[key]),
            "size_mb": size / 1e6,
            "nodes": len(model.graph.node),
            "reduce_mean": sum(n.op_type == "ReduceMean" for n in model.graph.node),
            "output": sessions[key].run(None, feeds[key])[0],
        }
    return rows


def _simplifier(tool: str):
    """The simplifier's model -> model function (ImportError when it is not installed)."""
    if tool == "onnxsim":
        import onnxsim

        return lambda model: onnxsim.simplify(model)[0]
    import onnxslim

    return onnxslim.slim


def torch_export(model, x, path: Path, dynamo: bool) -> float:
    t = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["input"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=18,
                input_names=["input"],
                dynamic_axes={"input": {0: "batch"}},
            )
    return time.perf_counter() - t


MODELS = ("resnetv2_50", "vit_hybrid", "nfnet_f0", "diffusion_unet")


def build(name: str) -> tuple[torch.nn.Module, list[tuple[int, ...]], list[str | None]]:
    """The model, its input shapes (batch 1) and input dtypes (None: float32)."""
    torch.manual_seed(0)
    if name == "resnetv2_50":
        return resnetv2_50().eval(), [(1, 3, 224, 224)], [None]
    if name == "vit_hybrid":
        from vit_hybrid import ViTHybrid

        return ViTHybrid(dim=384, depth=6, heads=6).eval(), [(1, 3, 224, 224)], [None]
    if name == "nfnet_f0":
        from nfnet import nfnet_f0

        return nfnet_f0().eval(), [(1, 3, 192, 192)], [None]
    if name == "diffusion_unet":
        import models

        return models.diffusion_unet().eval(), [(1, 3, 32, 32), (1,)], [None, "int64"]
    raise SystemExit(f"unknown model {name!r}: use one of {', '.join(MODELS)}")


def direct_export(model, shapes, dtypes, path: Path, exporter: str) -> float:
    """torch.onnx.export of the unbaked model at batch 2 with a dynamic batch, as a user would call it."""
    args = tuple(
        torch.randint(0, 1000, (2, *s[1:])) if d == "int64" else torch.randn(2, *s[1:]) for s, d in zip(shapes, dtypes)
    )
    if len(args) == 1:
        return torch_export(model, args[0], path, dynamo=exporter == "dynamo")
    names = [f"input_{i}" for i in range(len(args))]
    t = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        kwargs = {"dynamo": exporter == "dynamo", "opset_version": 18, "input_names": names}
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
        else:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
        torch.onnx.export(model, args, str(path), **kwargs)
    return time.perf_counter() - t


def sample_inputs(shapes, dtypes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"input_{i}": rng.integers(0, 1000, s) if d == "int64" else rng.standard_normal(s).astype(np.float32)
        for i, (s, d) in enumerate(zip(shapes, dtypes))
    }


def compare_models(names: list[str], rounds: int = 9, runs: int = 30) -> dict[str, dict]:
    """The models table: per model and exporter, wsfold's graph against the unbaked export simplified by each
    tool."""
    results = {}
    print(f"\n{'model':16} {'exporter':12} {'nodes: wsfold / onnxsim / onnxslim':36} {'session':>8} {'latency':>8}")
    for name in names:
        model, shapes, dtypes = build(name)
        for exporter in ("dynamo", "torchscript"):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                raw = tmp / "raw.onnx"
                direct_export(model, shapes, dtypes, raw, exporter)
                paths = {}
                for tool in ("onnxsim", "onnxslim"):
                    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                        warnings.simplefilter("ignore")
                        paths[tool] = tmp / f"{tool}.onnx"
                        onnx.save(_simplifier(tool)(onnx.load(str(raw))), str(paths[tool]))
                baked, report = bake_model(model)
                paths["wsfold"] = tmp / "wsfold.onnx"
                export_onnx(baked, paths["wsfold"], input_shapes=shapes, input_dtypes=dtypes, exporter=exporter)
                rows = measure_all(paths, sample_inputs(shapes, dtypes), rounds=rounds, runs=runs)
            outputs = {k: r.pop("output") for k, r in rows.items()}
            for key, row in rows.items():
                row["max_abs_diff_vs_onnxsim"] = float(np.abs(outputs[key] - outputs["onnxsim"]).max())
            best = min(("onnxsim", "onnxslim"), key=lambda t: (rows[t]["nodes"], rows[t]["session_s"]))
            w = rows["wsfold"]
            ratio = {k: w[k] / rows[best][k] for k in ("nodes", "session_s", "latency_ms")}
            results[f"{name}/{exporter}"] = {"rows": rows, "best_simplifier": best, "ratio_vs_best": ratio}
            counts = f"{w['nodes']} / {rows['onnxsim']['nodes']} / {rows['onnxslim']['nodes']}"
            print(
                f"{name:16} {exporter:12} {counts:36} {ratio['session_s']:8.2f} {ratio['latency_ms']:8.2f}"
                f"   (ratios vs {best})",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="the models table's models, comma-separated")
    parser.add_argument("--skip-variants", action="store_true", help="leave out the ResNetV2-50 variants table")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    for name in names:
        if name not in MODELS:
            build(name)  # says which names there are, before anything runs
    torch.set_num_threads(2)
    variants = {} if args.skip_variants else export_variants()
    models = compare_models(names)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**variants, "models": models}, indent=2, default=float))


def export_variants() -> dict[str, dict]:
    """The variants table (ResNetV2-50): every way to export, with its figures and wsfold's ratios."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = resnetv2_50().eval()
    x = torch.randn(2, 3, 224, 224)
    x1 = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x1)).numpy()
    paths: dict[str, Path] = {}
    export_s: dict[str, float] = {}
    export_only_s: dict[str, float] = {}  # wsfold rows: the export of the baked model alone
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Warm both exporters and onnxruntime up, so that their one-time start-up costs (the dynamo exporter's
        # imports and tables take seconds) land on no row: every row is timed warm, in one process.
        warm = tmp / "warm.onnx"
        for dynamo in (False, True):
            torch_export(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), warm, dynamo=dynamo)
        export_onnx(torch.nn.Conv2d(3, 4, 3), tmp / "warm_wsfold.onnx", input_shapes=[(1, 3, 8, 8)])
        ort.InferenceSession(str(warm), providers=["CPUExecutionProvider"])
        for exporter in ("torchscript", "dynamo"):
            key = f"torch.onnx.export unbaked ({exporter})"
            paths[key] = tmp / f"unbaked_{exporter}.onnx"
            export_s[key] = torch_export(model, x, paths[key], dynamo=exporter == "dynamo")
        # What a user would run instead: a graph simplifier on the unbaked export.
        for tool in ("onnxsim", "onnxslim"):
            try:
                simplify = _simplifier(tool)
            except ImportError:
                print(f"{tool} is not installed (pip install -e '.[bench]'): skipped", file=sys.stderr)
                continue
            for exporter in ("torchscript", "dynamo"):
                key = f"unbaked ({exporter}) + {tool}"
                paths[key] = tmp / f"unbaked_{exporter}_{tool}.onnx"
                t = time.perf_counter()
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    onnx.save(simplify(onnx.load(str(tmp / f"unbaked_{exporter}.onnx"))), str(paths[key]))
                export_s[key] = export_s[f"torch.onnx.export unbaked ({exporter})"] + time.perf_counter() - t
        for exporter in ("torchscript", "dynamo"):
            key = f"wsfold (bake + export, {exporter})"
            paths[key] = tmp / f"wsfold_{exporter}.onnx"
            t = time.perf_counter()
            baked, report = bake_model(model)
            t_baked = time.perf_counter()
            export_onnx(baked, paths[key], input_shapes=[(1, 3, 224, 224)], exporter=exporter, bake_report=report)
            export_s[key] = time.perf_counter() - t
            export_only_s[key] = time.perf_counter() - t_baked
        # The floor: the same architecture built with plain convs (what a hand-written baked model would be).
        plain = resnetv2_50(plain=True).eval()
        plain.load_state_dict(baked.state_dict())
        key = "plain-conv architecture (torchscript)"
        paths[key] = tmp / "plain.onnx"
        export_s[key] = torch_export(plain, x, paths[key], False)
        rows = measure_all(paths, x1)
        for key, row in rows.items():
            row["export_s"] = export_s[key]
            if key in export_only_s:
                row["export_of_baked_s"] = export_only_s[key]
    for row in rows.values():
        out = row.pop("output")
        row["max_abs_err_vs_torch"] = float(np.abs(out - reference).max())

    ts = rows["torch.onnx.export unbaked (torchscript)"]
    unbaked_best_session = min(r["session_s"] for k, r in rows.items() if k.startswith("torch.onnx"))
    cols = ("export s", "session s", "lat ms", "MB", "nodes", "RMean", "max err")
    print(f"{'variant':44} " + " ".join(f"{c:>9}" for c in cols))
    print("| variant | export s | session s | latency ms | MB | nodes | ReduceMean | max err |", file=sys.stderr)
    for name, r in rows.items():
        print(
            f"{name:44} {r['export_s']:9.2f} {r['session_s']:9.3f} {r['latency_ms']:9.2f} {r['size_mb']:9.1f} "
            f"{r['nodes']:9d} {r['reduce_mean']:9d} {r['max_abs_err_vs_torch']:9.2e}"
        )
        print(
            f"| {name} | {r['export_s']:.2f} | {r['session_s']:.3f} | {r['latency_ms']:.1f} | {r['size_mb']:.1f} | "
            f"{r['nodes']} | {r['reduce_mean']} | {r['max_abs_err_vs_torch']:.1e} |",
            file=sys.stderr,
        )
    w = rows["wsfold (bake + export, dynamo)"]
    ratios = {
        "session_vs_unbaked_torchscript": w["session_s"] / ts["session_s"],
        "session_vs_unbaked_dynamo": w["session_s"] / rows["torch.onnx.export unbaked (dynamo)"]["session_s"],
        "session_vs_best_unbaked": w["session_s"] / unbaked_best_session,
        "session_vs_plain_conv_floor": w["session_s"] / rows["plain-conv architecture (torchscript)"]["session_s"],
        "size_vs_unbaked_torchscript": w["size_mb"] / ts["size_mb"],
        "latency_vs_unbaked_torchscript": w["latency_ms"] / ts["latency_ms"],
        "latency_vs_unbaked_dynamo": w["latency_ms"] / rows["torch.onnx.export unbaked (dynamo)"]["latency_ms"],
        "export_time_vs_unbaked_torchscript": w["export_s"] / ts["export_s"],
        "export_time_vs_unbaked_dynamo": w["export_s"] / rows["torch.onnx.export unbaked (dynamo)"]["export_s"],
        "export_of_baked_vs_unbaked_dynamo": w["export_of_baked_s"]
        / rows["torch.onnx.export unbaked (dynamo)"]["export_s"],
    }
    print("\nratios (wsfold's default, bake + dynamo export, against each alternative; all timed warm)")
    for k, v in ratios.items():
        print(f"  {k:40} {v:6.3f}")
    return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
