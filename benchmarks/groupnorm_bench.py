"""GroupNorm as wsfold writes it (Reshape -> InstanceNormalization -> Reshape -> Mul -> Add) against the ONNX
GroupNormalization op (opset 21: per-channel scale and bias), on onnxruntime's CPU provider (not part of the tests):

    .venv/bin/python benchmarks/groupnorm_bench.py [--channels 256 --groups 32 --size 56 --runs 200]

Prints each form's median latency over interleaved runs, their ratio, the largest difference between their
outputs, and the ops onnxruntime runs for the GroupNormalization op once it has optimized the graph (onnxruntime
1.32 has no CPU kernel for it: it expands the op's function body into primitive ops).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def forms(channels: int, groups: int, size: int, rng: np.random.Generator) -> dict[str, onnx.ModelProto]:
    scale, bias = rng.random(channels).astype(np.float32), rng.random(channels).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)

    def model(nodes, inits, opset):
        graph = helper.make_graph(nodes, "groupnorm", [x], [y], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    split = [
        numpy_helper.from_array(np.array([0, groups, -1], np.int64), "grouped"),
        numpy_helper.from_array(np.ones(groups, np.float32), "one"),
        numpy_helper.from_array(np.zeros(groups, np.float32), "zero"),
        numpy_helper.from_array(np.array([0, channels, size, size], np.int64), "back"),
        numpy_helper.from_array(scale.reshape(channels, 1, 1), "scale"),
        numpy_helper.from_array(bias.reshape(channels, 1, 1), "bias"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "grouped"], ["r"]),
        helper.make_node("InstanceNormalization", ["r", "one", "zero"], ["n"], epsilon=1e-5),
        helper.make_node("Reshape", ["n", "back"], ["b"]),
        helper.make_node("Mul", ["b", "scale"], ["m"]),
        helper.make_node("Add", ["m", "bias"], ["y"]),
    ]
    op = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=1e-5)
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")]
    return {"instancenorm (wsfold)": model(nodes, split, 18), "GroupNormalization-21": model([op], inits, 21)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    models = forms(args.channels, args.groups, args.size, rng)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = {
        k: ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for k, m in models.items()
    }
    x = rng.standard_normal((1, args.channels, args.size, args.size)).astype(np.float32)
    outputs = {k: s.run(None, {"x": x})[0] for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"x": x})
            times[key].append(time.perf_counter() - start)
    medians = {k: 1000 * statistics.median(v) for k, v in times.items()}
    for key, ms in medians.items():
        print(f"{key:24} {ms:8.3f} ms")
    first, second = medians.values()
    print(f"GroupNormalization / wsfold's form: {second / first:.2f}x")
    print(f"largest output difference: {float(np.abs(np.subtract(*outputs.values())).max()):.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(saved)
        ort.InferenceSession(
            models["GroupNormalization-21"].SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        ops = [n.op_type for n in onnx.load(str(saved)).graph.node]
    print(f"onnxruntime {ort.__version__} runs GroupNormalization-21 as {len(ops)} ops: {', '.join(sorted(set(ops)))}")


if __name__ == "__main__":
    main()
