"""wsfold's graph against what a user would otherwise run, a direct export followed by onnxsim or onnxslim, on
several weight-standardized models, with both exporters (not part of the tests; pip install -e '.[bench]'):

    .venv/bin/python benchmarks/simplify_bench.py [--models resnetv2_50,vit_hybrid,diffusion_unet] [--json F]

Per model and exporter: nodes, session creation and batch-1 latency (medians of interleaved runs, in one process)
of wsfold's graph, and of the unbaked export simplified by each tool, printed as ratios against the better
simplifier (below 1: wsfold's is smaller or faster). Random init, dynamic batch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fixtures"))
from export_bench import _simplifier, measure_all, torch_export  # noqa: E402

from wsfold.bake.baker import bake_model  # noqa: E402
from wsfold.onnx.export import export_onnx  # noqa: E402


def build(name: str) -> tuple[torch.nn.Module, list[tuple[int, ...]], list[str | None]]:
    torch.manual_seed(0)
    if name == "resnetv2_50":
        from resnetv2 import resnetv2_50

        return resnetv2_50().eval(), [(1, 3, 224, 224)], [None]
    if name == "vit_hybrid":
        from vit_hybrid import ViTHybrid

        return ViTHybrid(dim=384, depth=6, heads=6).eval(), [(1, 3, 224, 224)], [None]
    if name == "diffusion_unet":
        import models

        return models.diffusion_unet().eval(), [(1, 3, 32, 32), (1,)], [None, "int64"]
    raise SystemExit(f"unknown model {name!r}: use resnetv2_50, vit_hybrid or diffusion_unet")


def direct_export(model, shapes, dtypes, path: Path, exporter: str) -> None:
    args = tuple(
        torch.randint(0, 1000, (2, *s[1:])) if d == "int64" else torch.randn(2, *s[1:]) for s, d in zip(shapes, dtypes)
    )
    if len(args) == 1:
        torch_export(model, args[0], path, dynamo=exporter == "dynamo")
        return
    names = [f"input_{i}" for i in range(len(args))]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        kwargs = {"dynamo": exporter == "dynamo", "opset_version": 18, "input_names": names}
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
        else:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
        torch.onnx.export(model, args, str(path), **kwargs)


def feeds_for(path: Path, shapes, dtypes) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path), load_external_data=False).graph
    rng = np.random.default_rng(0)
    return {
        value.name: (rng.integers(0, 1000, s) if d == "int64" else rng.standard_normal(s).astype(np.float32))
        for value, s, d in zip(graph.input, shapes, dtypes)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnetv2_50,vit_hybrid,diffusion_unet")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.models.split(",")
    for name in names:
        build(name)  # an unknown name is said before anything runs
    torch.set_num_threads(2)
    results = {}
    print(f"{'model':16} {'exporter':12} {'nodes: wsfold / onnxsim / onnxslim':36} {'session':>8} {'latency':>8}")
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
                rows = measure_all_multi(paths, shapes, dtypes)
            best = min(("onnxsim", "onnxslim"), key=lambda t: (rows[t]["nodes"], rows[t]["session_s"]))
            w = rows["wsfold"]
            ratio = {k: w[k] / rows[best][k] for k in ("nodes", "session_s", "latency_ms")}
            results[f"{name}/{exporter}"] = {"rows": rows, "best_simplifier": best, "ratio_vs_best": ratio}
            counts = f"{w['nodes']} / {rows['onnxsim']['nodes']} / {rows['onnxslim']['nodes']}"
            print(
                f"{name:16} {exporter:12} {counts:36} {ratio['session_s']:8.2f} {ratio['latency_ms']:8.2f}"
                f"   (ratios vs {best})"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


def measure_all_multi(paths: dict[str, Path], shapes, dtypes) -> dict[str, dict]:
    """export_bench.measure_all for graphs of one or several inputs."""
    if len(shapes) == 1:
        x = np.random.default_rng(0).standard_normal(shapes[0]).astype(np.float32)
        rows = measure_all(paths, x)
    else:
        import statistics
        import time

        import onnxruntime as ort

        rows = {}
        sessions, created = {}, {k: [] for k in paths}
        for _ in range(3):
            for key, path in paths.items():
                t = time.perf_counter()
                sessions[key] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                created[key].append(time.perf_counter() - t)
        feeds = {k: feeds_for(p, shapes, dtypes) for k, p in paths.items()}
        latency = {k: [] for k in paths}
        for _ in range(30):
            for key, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, feeds[key])
                latency[key].append(time.perf_counter() - t)
        for key, path in paths.items():
            rows[key] = {
                "session_s": statistics.median(created[key]),
                "latency_ms": 1000 * statistics.median(latency[key]),
                "nodes": len(onnx.load(str(path), load_external_data=False).graph.node),
            }
    for row in rows.values():
        row.pop("output", None)
    return rows


if __name__ == "__main__":
    main()
