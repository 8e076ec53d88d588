"""wsfold export against torch.onnx.export of the unbaked model (both exporters), and against onnxsim and onnxslim
applied to those exports (installed with pip install -e '.[bench]'). Builds a ResNetV2-50 GN+WS network in-process; not part of the tests.

    .venv/bin/python benchmarks/export_bench.py [--json build/export_bench.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnetv2 import resnetv2_50  # noqa: E402

torch.set_num_threads(2)

from wsfold.bake.baker import bake_model  # noqa: E402
from wsfold.onnx.export import export_onnx  # noqa: E402


def measure_all(paths: dict[str, Path], x: np.ndarray, rounds: int = 3, runs: int = 30) -> dict[str, dict]:
    """Session creation and latency for every graph, interleaved round by round so that machine noise and
    ordering effects hit every variant alike."""
    created: dict[str, list[float]] = {k: [] for k in paths}
    sessions = {}
    for _ in range(rounds):
        for key, path in paths.items():
            t = time.perf_counter()
            sessions[key] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            created[key].append(time.perf_counter() - t)
    name = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for key, sess in sessions.items():
        for _ in range(3):
            sess.run(None, {name[key]: x})
    latency: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(runs):
        for key, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {name[key]: x})
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
            "output": sessions[key].run(None, {name[key]: x})[0],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
