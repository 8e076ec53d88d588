"""Peak memory of `wsfold export` and `wsfold verify` against the checkpoint size (not part of the test suite):

    .venv/bin/python benchmarks/memory_bench.py [--out build/membench] [--sizes base,large] [--formats safetensors,pt]

Builds ViT hybrids with a GN+WS ResNetV2 backbone in-process (benchmarks/vit_hybrid.py): `base` has the shape of
timm's vit_base_r50_s16_224 (98.7 M parameters, a 0.39 GB float32 checkpoint), `large` is twice as deep and
wider (dim 1024, 24 blocks: 1.3 GB). Each command runs in its own process and reports its own peak RSS (VmHWM);
the import floor (python -c "import torch, onnx, onnxruntime, wsfold.cli.app") is measured the same way, so the
slope between the two sizes says how memory grows with the checkpoint. With OpenVINO installed, verify also runs
with --runtime openvino and with both runtimes: each runtime's session is released before the next loads, so two
runtimes should peak within 10% of one. The `base` model is also exported from a .pt state dict (torch.save), and
a convolution-heavy ResNetV2-50x2 (0.39 GB, benchmarks/resnetv2.py) is exported and verified: `r50x2` rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run import RUNNER  # noqa: E402

SIZES = {"base": {}, "large": {"dim": 1024, "depth": 24, "heads": 16}}


def measured(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("MEASURE")), None)
    if line is None:
        raise RuntimeError(f"{argv} failed:\n{proc.stderr[-2000:]}")
    _, secs, rss, code = line.split()
    return {"seconds": float(secs), "peak_rss_bytes": int(rss), "exit": int(code)}


def build(size: str, path: Path) -> int:
    """The checkpoint of model ``size`` (a ViT hybrid size, or r50x2) at ``path``: .safetensors or .pt."""
    if not path.exists():
        make = (
            "import resnetv2; m = resnetv2.resnetv2_50(width=2)"
            if size == "r50x2"
            else f"import vit_hybrid; m = vit_hybrid.ViTHybrid(**{SIZES[size]!r})"
        )
        save = (
            "torch.save(m.state_dict(), p)"
            if path.suffix == ".pt"
            else "from safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in m.state_dict().items()}, p)"
        )
        code = f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); torch.manual_seed(0); {make}; p = {str(path)!r}; {save}"
        subprocess.run([sys.executable, "-c", code], check=True)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "membench")
    parser.add_argument("--sizes", default="base,large")
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--formats", default="safetensors,pt", help="the base model's source formats")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    floor_script = args.out / "floor.py"
    floor_script.write_text("import torch, onnx, onnxruntime, wsfold.cli.app\n")
    floor = measured(str(floor_script))
    results = {"import_floor": floor, "models": {}}
    for size in args.sizes.split(","):
        ckpt = args.out / f"vit_{size}.safetensors"
        nbytes = build(size, ckpt)
        kwargs = json.dumps(SIZES[size]) if SIZES[size] else "{}"
        common = [str(ckpt), "--arch", f"{HERE / 'vit_hybrid.py'}:ViTHybrid", "--arch-kwargs", kwargs]
        row = {"checkpoint_bytes": nbytes}
        for exporter in args.exporters.split(","):
            onnx_path = args.out / f"vit_{size}.{exporter}.onnx"
            argv = ["-m", "wsfold", "export", *common, "--onnx", str(onnx_path), "--force", "-q"]
            row[f"export_{exporter}"] = measured(*argv, "--exporter", exporter)
        onnx_path = args.out / f"vit_{size}.{args.exporters.split(',')[0]}.onnx"
        row["verify"] = measured("-m", "wsfold", "verify", *common, "--onnx", str(onnx_path), "-q")
        if importlib.util.find_spec("openvino") is not None:
            verify = ["-m", "wsfold", "verify", *common, "--onnx", str(onnx_path), "-q"]
            row["verify_openvino"] = measured(*verify, "--runtime", "openvino")
            row["verify_ort+openvino"] = measured(*verify, "--runtime", "onnxruntime", "--runtime", "openvino")
        if size == "base" and "pt" in args.formats.split(","):
            pt = args.out / "vit_base.pt"
            build(size, pt)
            argv = ["-m", "wsfold", "export", str(pt), "--arch", f"{HERE / 'vit_hybrid.py'}:ViTHybrid"]
            out = args.out / "vit_base_pt.onnx"
            row["export_dynamo_from_pt"] = measured(*argv, "--onnx", str(out), "--force", "-q")
        results["models"][size] = row
    # Convolution-heavy: verify's per-layer check and onnxruntime's session weigh most here.
    ckpt = args.out / "r50x2.safetensors"
    nbytes = build("r50x2", ckpt)
    common = [str(ckpt), "--arch", f"{HERE / 'resnetv2.py'}:resnetv2_50", "--arch-kwargs", '{"width": 2}']
    onnx_path = args.out / "r50x2.onnx"
    row = {"checkpoint_bytes": nbytes}
    row["export_dynamo"] = measured("-m", "wsfold", "export", *common, "--onnx", str(onnx_path), "--force", "-q")
    row["verify"] = measured("-m", "wsfold", "verify", *common, "--onnx", str(onnx_path), "-q")
    results["models"]["r50x2"] = row
    print(f"import floor: {floor['peak_rss_bytes'] / 1e9:.2f} GB")
    print(f"{'model':8} {'ckpt GB':>8} {'step':20} {'s':>7} {'peak GB':>8} {'peak/ckpt':>9} {'exit':>4}")
    for size, row in results["models"].items():
        for key, m in row.items():
            if key == "checkpoint_bytes":
                continue
            print(
                f"{size:8} {row['checkpoint_bytes'] / 1e9:8.2f} {key:20} {m['seconds']:7.1f} "
                f"{m['peak_rss_bytes'] / 1e9:8.2f} {m['peak_rss_bytes'] / row['checkpoint_bytes']:9.2f} {m['exit']:>4}"
            )
    for size, row in results["models"].items():
        if "verify_ort+openvino" in row:
            one = max(row["verify"]["peak_rss_bytes"], row["verify_openvino"]["peak_rss_bytes"])
            both = row["verify_ort+openvino"]["peak_rss_bytes"]
            print(f"{size}: verify with two runtimes peaks at {both / one:.3f}x the larger of one runtime alone")
    sizes = [s for s in results["models"] if s in SIZES]
    if len(sizes) >= 2:
        a, b = results["models"][sizes[0]], results["models"][sizes[-1]]
        growth = b["checkpoint_bytes"] - a["checkpoint_bytes"]
        for key in (k for k in a if k in b):
            if key != "checkpoint_bytes":
                slope = (b[key]["peak_rss_bytes"] - a[key]["peak_rss_bytes"]) / growth
                results.setdefault("slopes", {})[key] = slope
                print(f"slope {key:20} {slope:.2f} GB of peak per GB of checkpoint")
    (args.out / "memory_bench.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'memory_bench.json'}")


if __name__ == "__main__":
    main()
