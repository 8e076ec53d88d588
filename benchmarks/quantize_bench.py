"""float32 against int8, measured in one run (not part of the test suite):

    .venv/bin/python benchmarks/quantize_bench.py [--out build/qbench] [--repeat 200] [--skip-resnet]

1. The trained digits fixture (a WS+GN network, scikit-learn's digits): size, batch-1 latency with onnxruntime (and
   OpenVINO when installed; medians of interleaved runs) and test accuracy, the float graph `wsfold export` writes
   against the int8 graph `wsfold quantize` writes.
2. ResNetV2-50 (BiT, random init, 224x224, 102 MB): time and peak RSS of `wsfold quantize` (32 random calibration
   samples) against `wsfold export` of the same checkpoint, each in its own process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CKPT = ROOT / "fixtures" / "ckpt"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "fixtures"))
from run import RUNNER  # noqa: E402


def measured(*argv: str, ok: tuple[int, ...] = (0,)) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("MEASURE")), None)
    if line is None or proc.returncode not in ok:
        raise RuntimeError(f"{argv} failed:\n{proc.stderr[-2000:]}")
    _, secs, rss, _ = line.split()
    return {"seconds": float(secs), "peak_rss_bytes": int(rss)}


def wsfold(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "wsfold", *args], check=True, cwd=ROOT)


def latencies(paths: dict[str, Path], x: np.ndarray, repeat: int) -> dict[str, dict[str, float]]:
    """Batch-1 latency (ms) per graph and runtime, interleaved so that drift hits every row alike."""
    import onnxruntime as ort

    runners = {}
    for name, path in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        runners[(name, "onnxruntime")] = lambda s=session: s.run(None, {"x": x})
        if importlib.util.find_spec("openvino") is not None:
            import openvino as ov

            compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
            runners[(name, "openvino")] = lambda c=compiled: c({"x": x})
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for _ in range(repeat):
        for key, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    result: dict[str, dict[str, float]] = {}
    for (name, runtime), values in times.items():
        result.setdefault(name, {})[runtime] = statistics.median(values)
    return result


def digits(out: Path, repeat: int) -> dict:
    import onnxruntime as ort
    from digits import accuracy

    arch = f"{ROOT / 'fixtures' / 'digits.py'}:digits_net"
    src = CKPT / "digits_wsgn.safetensors"
    fp32, int8 = out / "digits.onnx", out / "digits.int8.onnx"
    wsfold("export", str(src), "--arch", arch, "--onnx", str(fp32), "--input-shape", "1,1,8,8", "--force", "-q")
    wsfold(
        "quantize", str(src), "--arch", arch, "--calibration", str(CKPT / "digits_calibration.npz"),
        "--holdout", str(CKPT / "digits_test.npz"), "--onnx", str(int8), "--force", "-q",
    )  # fmt: skip
    test = np.load(CKPT / "digits_test.npz")
    rows = {}
    for name, path in (("float32", fp32), ("int8", int8)):
        logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": test["x"]})[0]
        rows[name] = {"bytes": path.stat().st_size, "accuracy": accuracy(logits, test["labels"])}
    lat = latencies({"float32": fp32, "int8": int8}, test["x"][:1], repeat)
    for name in rows:
        rows[name]["latency_ms"] = lat[name]
    return rows


def resnet(out: Path) -> dict:
    import torch
    from resnetv2 import resnetv2_50
    from safetensors.torch import save_file

    src = out / "resnetv2_50.safetensors"
    if not src.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in resnetv2_50().state_dict().items()}, str(src))
    cal = out / "cal.npz"
    np.savez(cal, x=np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32))
    common = [str(src), "--arch", f"{HERE / 'resnetv2.py'}:resnetv2_50", "--input-shape", "1,3,224,224"]
    export = measured("-m", "wsfold", "export", *common, "--onnx", str(out / "r50.onnx"), "--force", "-q")
    quant = measured(
        "-m", "wsfold", "quantize", *common, "--calibration", str(cal), "--onnx", str(out / "r50.int8.onnx"),
        "--force", "--keep-failing", "-q", ok=(0, 1),  # random weights and inputs: the verdict may fail
    )  # fmt: skip
    return {"checkpoint_bytes": src.stat().st_size, "export": export, "quantize": quant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "qbench")
    parser.add_argument("--repeat", type=int, default=200, help="latency runs per graph and runtime (>= 1)")
    parser.add_argument("--skip-resnet", action="store_true", help="only the digits fixture")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"digits": digits(args.out, args.repeat)}
    print("digits (trained WS+GN network, 597 test images):")
    print(
        f"{'graph':8} {'KB':>7} {'accuracy':>9} "
        + " ".join(f"{r + ' ms':>16}" for r in results["digits"]["int8"]["latency_ms"])
    )
    for name, row in results["digits"].items():
        lat = " ".join(f"{v:16.4f}" for v in row["latency_ms"].values())
        print(f"{name:8} {row['bytes'] / 1e3:7.1f} {row['accuracy']:9.4f} {lat}")
    f, q = results["digits"]["float32"], results["digits"]["int8"]
    print(f"int8 / float32: size {q['bytes'] / f['bytes']:.2f}x, accuracy {q['accuracy'] - f['accuracy']:+.4f}, "
          + ", ".join(f"{r} latency {q['latency_ms'][r] / f['latency_ms'][r]:.2f}x" for r in q["latency_ms"]))  # fmt: skip
    if not args.skip_resnet:
        r = results["resnetv2_50"] = resnet(args.out)
        print(f"ResNetV2-50 ({r['checkpoint_bytes'] / 1e6:.0f} MB checkpoint):")
        for step in ("export", "quantize"):
            m = r[step]
            print(f"  {step:9} {m['seconds']:7.1f} s  peak {m['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"({m['peak_rss_bytes'] / r['checkpoint_bytes']:.2f}x the checkpoint)")  # fmt: skip
        print(f"  quantize / export: time {r['quantize']['seconds'] / r['export']['seconds']:.2f}x, peak RSS "
              f"{r['quantize']['peak_rss_bytes'] / r['export']['peak_rss_bytes']:.2f}x")  # fmt: skip
    (args.out / "quantize_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
