"""wsfold against the alternatives, measured in one run (not part of the test suite):

    .venv/bin/python benchmarks/run.py [--out build/bench]

Builds ResNetV2 GN+WS networks in-process (R50x1; R50x4, a wide network whose float32 checkpoint is 1.53 GB; R101x3,
a deep one of the same size with about twice the layers, as timm's resnetv2_101x3_bit), writes their state-dict
checkpoints, and measures, each step in its own process so that peak RSS is that step's alone: bake seconds against
torch.load + torch.save of the same checkpoint (the I/O floor; medians of --repeat alternating runs, each started
with the checkpoint and the imported files in the page cache and no writes pending, so that no run pays for the one
before it; timed from after the interpreter's start-up to the end of the job, and, as "process", the whole process
as a shell's `time` shows it), `bake --fsync` (which also waits for the disk, as load+save does not) in the same
alternation, every run printed with the CPU time this machine spent on anything else meanwhile and the CPU time the
hypervisor gave other guests (/proc/stat's steal), peak RSS (the worst run) against the checkpoint size, eager
latency at batch 1 of the baked model against the original and against the same architecture built with plain convs,
and the export figures of benchmarks/export_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNER = """
import runpy, sys, time
t = time.perf_counter()
sys.argv = sys.argv[1:]
code = 0
try:
    if sys.argv[0] == "-m":
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__")
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
# VmHWM is this process's own peak. (ru_maxrss is not: Linux carries the forking parent's resident size across
# fork and exec into it, so a child of a large parent reports the parent's size.)
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print("MEASURE", time.perf_counter() - t, hwm, code, file=sys.stderr)
sys.exit(code)
"""


def settle(checkpoint: Path) -> None:
    """The same start for every run: the checkpoint, and what importing torch and wsfold reads (torch's libraries
    among them: this machine's page cache is at times emptied from outside, and the run after that would read
    ~1 GB of them from disk), read into the page cache, and every earlier write on disk (the last run's 1.5 GB
    output would otherwise be written back during this one)."""
    warm = "import torch, wsfold.cli.app, wsfold.pipeline, wsfold.artifacts.save"
    subprocess.run([sys.executable, "-c", warm], check=True, cwd=ROOT)
    with open(checkpoint, "rb", buffering=0) as fh:
        while fh.read(16 << 20):
            pass
    os.sync()


def measured(*argv: str) -> dict:
    """Run argv in a fresh interpreter; its wall time from after the interpreter's start-up to the end of the job
    (``seconds``), the whole process's wall time as a shell's ``time`` shows it, start-up and shutdown included
    (``process_seconds``), and its peak RSS."""
    (busy, steal), children = cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, cwd=ROOT)
    whole = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    busy_after, steal_after = cpu_seconds()
    steal, others = steal_after - steal, busy_after - busy - cpu
    line = next((x for x in proc.stderr.splitlines() if x.startswith("MEASURE")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{argv} failed:\n{proc.stderr[-2000:]}")
    _, secs, rss, _ = line.split()
    return {
        "seconds": float(secs),
        "process_seconds": whole,
        "peak_rss_bytes": int(rss),
        "cpu_seconds": cpu,
        "host_steal_seconds": steal,
        # CPU time this machine spent on anything but the measured process meanwhile (the benchmark's own wait,
        # the kernel's writeback, another program): contention that steal does not show.
        "others_cpu_seconds": others,
    }


def cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds so far, summed over this machine's CPUs (/proc/stat): busy is user, nice, system,
    irq and softirq time; steal the time the hypervisor gave to other guests."""
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def summary(runs: list[dict]) -> dict:
    """Median seconds and worst peak RSS over runs, with every run kept."""
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "process_seconds": statistics.median(r["process_seconds"] for r in runs),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "runs": runs,
    }


# name: (builder in resnetv2.py, width factor)
MODELS = {
    "resnetv2_50x1": ("resnetv2_50", 1),
    "resnetv2_50x4": ("resnetv2_50", 4),
    "resnetv2_101x3": ("resnetv2_101", 3),
}


def builder(name: str):
    sys.path.insert(0, str(HERE))
    import resnetv2

    return getattr(resnetv2, MODELS[name][0])


def build_checkpoint(name: str, path: Path) -> int:
    """Written by a child process, so that this one stays small (see RUNNER)."""
    if not path.exists():
        code = (
            f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); import resnetv2; torch.manual_seed(0); "
            f"torch.save(resnetv2.{MODELS[name][0]}(width={MODELS[name][1]}).state_dict(), {str(path)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return path.stat().st_size


def latency(name: str, ckpt: Path, baked_path: Path, runs: int) -> dict:
    import torch

    torch.set_num_threads(2)
    build, width = builder(name), MODELS[name][1]
    sd = torch.load(ckpt, weights_only=True)
    original = build(width=width).eval()
    original.load_state_dict(sd)
    baked = torch.load(baked_path, weights_only=False).eval()
    plain = build(width=width, plain=True).eval()
    plain.load_state_dict(baked.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref, out = original(x), baked(x)
        err = float((out - ref).abs().max() / ref.abs().max())
        models = {"original": original, "baked": baked, "plain": plain}
        for m in models.values():
            m(x)
        times = {k: [] for k in models}
        keys = list(models)
        for i in range(runs):
            # Rotate the order so that no model always runs after the same one (caches, clocks).
            for key in keys[i % 3 :] + keys[: i % 3]:
                t = time.perf_counter()
                models[key](x)
                times[key].append(time.perf_counter() - t)
        # Both against the original computed in float64: a deep random-init network can be far from its own
        # float64 result in float32 (ResNetV2-101x3 here), and the baked one should be no farther.
        del plain, models
        wide = original.double()
        r64 = wide(x.double())
        scale = float(r64.abs().max())
        err64 = {"original": float((ref.double() - r64).abs().max()) / scale}
        err64["baked"] = float((out.double() - r64).abs().max()) / scale
        del wide
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    best = {k: 1000 * min(v) for k, v in times.items()}
    return {
        "latency_ms": med,
        "latency_min_ms": best,
        "baked_vs_original": med["baked"] / med["original"],
        "baked_vs_plain": med["baked"] / med["plain"],
        "baked_vs_plain_min": best["baked"] / best["plain"],
        "max_rel_err_baked_vs_original": err,
        "max_rel_err_vs_float64": err64,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "build" / "bench",
        help="where the checkpoints (built once, kept for the next run: 1.5 GB each for the big two), outputs and "
        "bench.json go (default: build/bench)",
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)} (the last two are 1.5 GB)"
    )
    parser.add_argument("--skip-export", action="store_true", help="leave out benchmarks/export_bench.py")
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs of load+save, of bake --fsync and of bake per model (default: 5)"
    )
    args = parser.parse_args()
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: {name!r} is not one of {', '.join(MODELS)}")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"models": {}}
    loadsave = args.out / "loadsave.py"
    loadsave.write_text(
        "import sys, torch\nsd = torch.load(sys.argv[1], weights_only=True)\ntorch.save(sd, sys.argv[2])\n"
    )
    for name in args.models.split(","):
        ckpt = args.out / f"{name}.pt"
        size = build_checkpoint(name, ckpt)
        baked_path = args.out / f"{name}.baked.pt"
        bake_argv = ["-m", "wsfold", "bake", str(ckpt), "--arch", f"{HERE / 'resnetv2.py'}:{MODELS[name][0]}"]
        bake_argv += ["--arch-kwargs", json.dumps({"width": MODELS[name][1]}), "-o", str(baked_path), "-q"]
        # Disk writes on a shared machine vary by tens of percent from run to run: alternate the two jobs,
        # compare medians of the times, and keep the worst peak RSS.
        # `bake --fsync` also waits for the disk (load+save does not): measured alongside, not in the ratio.
        floors, bakes, durables = [], [], []
        for _ in range(args.repeat):
            settle(ckpt)
            floors.append(measured(str(loadsave), str(ckpt), str(args.out / f"{name}.copy.pt")))
            (args.out / f"{name}.copy.pt").unlink()
            for argv, runs in ((bake_argv + ["--fsync"], durables), (bake_argv, bakes)):
                baked_path.unlink(missing_ok=True)
                settle(ckpt)
                runs.append(measured(*argv))
        floor, bake, durable = summary(floors), summary(bakes), summary(durables)
        lat = latency(name, ckpt, baked_path, runs=60 if name == "resnetv2_50x1" else 15)
        results["models"][name] = {
            "checkpoint_bytes": size,
            "load_save": floor,
            "bake": bake,
            "bake_fsync": durable,
            "bake_vs_load_save": bake["seconds"] / floor["seconds"],
            "bake_fsync_vs_load_save": durable["seconds"] / floor["seconds"],
            # the same for the whole processes, interpreter start-up and shutdown included
            "bake_vs_load_save_process": bake["process_seconds"] / floor["process_seconds"],
            # each bake against the load+save run just before it
            "bake_vs_load_save_runs": [b["seconds"] / f["seconds"] for b, f in zip(bakes, floors)],
            "bake_vs_load_save_pair_median": statistics.median(
                b["seconds"] / f["seconds"] for b, f in zip(bakes, floors)
            ),
            "bake_peak_rss_vs_checkpoint": bake["peak_rss_bytes"] / size,
            "load_save_peak_rss_vs_checkpoint": floor["peak_rss_bytes"] / size,
            **lat,
        }
        baked_path.unlink()
    if not args.skip_export:
        export_json = args.out / "export_bench.json"
        subprocess.run(
            [sys.executable, str(HERE / "export_bench.py"), "--json", str(export_json)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        results["export"] = json.loads(export_json.read_text())
    header = (
        f"{'model':16} {'ckpt GB':>8} {'load+save s':>11} {'bake s':>7} {'ratio':>6} {'bake RSS GB':>11} "
        f"{'ratio range':>11} {'process':>7} {'fsync s':>7} {'fsync ratio':>11} {'RSS/ckpt':>8} {'l+s RSS/ckpt':>12} {'orig ms':>8} {'baked ms':>8} {'plain ms':>8} {'b/orig':>6} {'b/plain':>7} {'err':>8} {'f64 err orig/baked':>18}"
    )
    print(header)
    for name, r in results["models"].items():
        lat = r["latency_ms"]
        print(
            f"{name:16} {r['checkpoint_bytes'] / 1e9:8.2f} {r['load_save']['seconds']:11.2f} {r['bake']['seconds']:7.2f} "
            f"{r['bake_vs_load_save']:6.2f} {r['bake']['peak_rss_bytes'] / 1e9:11.2f} "
            f"{min(r['bake_vs_load_save_runs']):5.2f}-{max(r['bake_vs_load_save_runs']):<5.2f} "
            f"{r['bake_vs_load_save_process']:7.2f} {r['bake_fsync']['seconds']:7.2f} {r['bake_fsync_vs_load_save']:11.2f} "
            f"{r['bake_peak_rss_vs_checkpoint']:8.2f} "
            f"{r['load_save_peak_rss_vs_checkpoint']:12.2f} {lat['original']:8.1f} {lat['baked']:8.1f} {lat['plain']:8.1f} "
            f"{r['baked_vs_original']:6.3f} {r['baked_vs_plain']:7.3f} {r['max_rel_err_baked_vs_original']:8.1e} "
            f"{r['max_rel_err_vs_float64']['original']:8.1e}/{r['max_rel_err_vs_float64']['baked']:8.1e}"
        )
    for name, r in results["models"].items():
        # Every run, so that the spread is there to see, with the CPU time the host gave other guests meanwhile.
        print(
            f"\n{name}: each run in seconds (in brackets: CPU seconds this machine spent on anything else meanwhile "
            "/ the hypervisor gave other guests)"
        )
        for label, key in (("load+save", "load_save"), ("bake", "bake"), ("bake --fsync", "bake_fsync")):
            cells = [
                f"{x['seconds']:.2f} ({x['others_cpu_seconds']:.2f}/{x['host_steal_seconds']:.2f})"
                for x in r[key]["runs"]
            ]
            print(f"  {label:13} {'  '.join(cells)}")
        print(
            f"  bake / load+save before it: {' '.join(f'{x:.2f}' for x in r['bake_vs_load_save_runs'])}, median "
            f"{r['bake_vs_load_save_pair_median']:.2f}"
        )
    if "export" in results:
        print("\nexport (ResNetV2-50x1):")
        for name, row in results["export"]["rows"].items():
            alone = (
                f" (export of the baked model {row['export_of_baked_s']:.2f} s)" if "export_of_baked_s" in row else ""
            )
            print(
                f"  {name:44} export {row['export_s']:6.2f} s{alone}, session {row['session_s']:.3f} s, "
                f"{row['latency_ms']:.1f} ms, {row['size_mb']:.1f} MB, {row['nodes']} nodes, {row['reduce_mean']} ReduceMean, "
                f"max err {row['max_abs_err_vs_torch']:.1e}"
            )
        for key, value in results["export"]["ratios"].items():
            print(f"  {key:40} {value:.3f}")
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out / 'bench.json'}")


if __name__ == "__main__":
    main()
