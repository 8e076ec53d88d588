"""Baked artifacts users can load: .safetensors by default (checked manifest, wsfold.load_baked), .pt2 with torch
alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import CATALOG, OUT_TOL, arch_spec, ckpt, fixture_input, load_fixture, rel_err
from typer.testing import CliRunner

import wsfold
from wsfold.cli.app import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_default_bake_output_is_safetensors_and_export_takes_it_without_allow_pickle(tmp_path):
    src = tmp_path / "bit.safetensors"
    src.write_bytes(ckpt("bit_tiny").read_bytes())
    res = run("bake", src, "--arch", arch_spec("bit_tiny"), "-q")
    assert res.exit_code == 0, res.stderr
    baked = tmp_path / "bit.baked.safetensors"
    assert baked.exists()
    res = run("export", baked, "--arch", arch_spec("bit_tiny"), "--onnx", tmp_path / "m.onnx", "-q")
    assert res.exit_code == 0, res.stderr
    res = run("verify", src, "--arch", arch_spec("bit_tiny"), "--onnx", tmp_path / "m.onnx", "-q")
    assert res.exit_code == 0, res.stdout
    model = wsfold.load_baked(baked, arch=arch_spec("bit_tiny"))
    x = fixture_input("bit_tiny")
    with torch.no_grad():
        assert rel_err(model(x), load_fixture("bit_tiny")(x)) < OUT_TOL[torch.float32]


def test_load_baked_refuses_a_file_wsfold_did_not_bake():
    with pytest.raises(wsfold.WsfoldError, match="no wsfold manifest"):
        wsfold.load_baked(ckpt("bit_tiny"), arch=arch_spec("bit_tiny"))


@pytest.mark.parametrize("name", ["bit_tiny", "ws_bn"])
def test_pt2_loads_in_a_python_with_only_torch_and_matches_at_batch_1_and_3(tmp_path, name):
    out = tmp_path / f"{name}.pt2"
    shape = ",".join(map(str, (1, *CATALOG[name]["input"][1:])))
    res = run("bake", ckpt(name), "--arch", arch_spec(name), "-o", out, "--input-shape", shape, "-q")
    assert res.exit_code == 0, res.stderr
    original = load_fixture(name)
    for batch in (1, 3):
        x = fixture_input(name, batch=batch)
        torch.save(x, tmp_path / f"x{batch}.pt")
        with torch.no_grad():
            torch.save(original(x), tmp_path / f"ref{batch}.pt")
    script = (
        "import sys, torch\n"
        f"m = torch.export.load({str(out)!r}).module()\n"
        "for b in (1, 3):\n"
        f"    x = torch.load({str(tmp_path)!r} + f'/x{{b}}.pt')\n"
        f"    ref = torch.load({str(tmp_path)!r} + f'/ref{{b}}.pt')\n"
        "    got = m(x)\n"
        "    err = float((got.double() - ref.double()).abs().max() / ref.double().abs().max())\n"
        "    assert got.shape == ref.shape and err < 1e-5, (b, err)\n"
        "assert not any(k.startswith('wsfold') or k == 'models' for k in sys.modules)\n"
        "print('ok')\n"
    )
    # -I: isolated (no PYTHONPATH, no current directory, no user site): torch, and nothing of wsfold's.
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_pt2_graph_holds_no_weight_arithmetic(tmp_path):
    out = tmp_path / "v.pt2"
    res = run("bake", ckpt("variants"), "--arch", arch_spec("variants"), "-o", out, "--input-shape", "1,3,12,12", "-q")
    assert res.exit_code == 0, res.stderr
    program = torch.export.load(str(out))
    ops = {getattr(n.target, "__name__", str(n.target)) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(op.startswith(("var", "mean", "std", "sqrt", "rsqrt", "batch_norm")) for op in ops), ops
    with torch.no_grad():
        x = fixture_input("variants", batch=1)
        assert rel_err(program.module()(x), load_fixture("variants")(x)) < OUT_TOL[torch.float32]


def test_a_pt2_is_a_source_for_export_and_verify_with_allow_pickle(tmp_path):
    pt2 = tmp_path / "bit.pt2"
    assert run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", pt2, "-q").exit_code == 0
    onnx_path = tmp_path / "bit.onnx"
    res = run("export", pt2, "--onnx", onnx_path, "--input-shape", "1,3,32,32")
    assert res.exit_code == 2 and "--allow-pickle" in res.stderr  # torch.export.load unpickles
    res = run("export", pt2, "--onnx", onnx_path, "--input-shape", "1,3,32,32", "--allow-pickle", "-q")
    assert res.exit_code == 0, res.stderr
    # The graph made from the .pt2 computes what the original checkpoint computes.
    res = run("verify", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "--onnx", onnx_path, "-q")
    assert res.exit_code == 0, res.stdout
    res = run("verify", pt2, "--allow-pickle", "--onnx", onnx_path, "--input-shape", "1,3,32,32", "-q")
    assert res.exit_code == 0, res.stdout


def test_dynamic_hw_from_a_pt2_with_fixed_sizes_is_refused(tmp_path):
    pt2 = tmp_path / "bit.pt2"
    assert run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", pt2, "-q").exit_code == 0
    out = tmp_path / "bit.onnx"
    res = run("export", pt2, "--onnx", out, "--input-shape", "1,3,32,32", "--allow-pickle", "--dynamic-hw")
    assert res.exit_code == 2 and "fixed spatial sizes" in res.stderr and not out.exists()


def test_written_back_keeps_what_the_block_writes_and_stops_its_thread(tmp_path):
    """The writeback thread starts disk writes of the files of a folder while they are written (they need not
    exist when the block starts); they end up exactly as written and the thread is gone after the block."""
    import threading
    import time

    from wsfold.io.paths import written_back

    path = tmp_path / "out.bin"
    chunks = [bytes([i]) * (1 << 20) for i in range(8)]
    with written_back(tmp_path, every=0.005):
        time.sleep(0.02)
        for name in ("first.tmp", "second.tmp"):  # the second replaces the first by a rename, as writers do
            with open(tmp_path / name, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    fh.flush()
                    time.sleep(0.005)
            (tmp_path / name).replace(path)
    assert path.read_bytes() == b"".join(chunks)
    assert not any(t.name == "wsfold-writeback" for t in threading.enumerate())


@pytest.mark.parametrize("flag", [[], ["--fsync"]])
def test_bake_flushes_the_checkpoint_to_disk_before_placing_it_only_with_fsync(tmp_path, monkeypatch, flag):
    """Without --fsync the file is moved into place complete but not flushed (as torch.save and safetensors
    write); with it, the file is fsynced in its temporary folder, with its disk writes started as it is
    written, before it is moved, and its folder after."""
    import os
    import threading

    import wsfold.io.paths

    synced, writeback = [], []
    real_fsync, real_written_back = os.fsync, wsfold.io.paths.written_back
    out = tmp_path / "bit.baked.safetensors"

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), out.exists()))
        return real_fsync(fd)

    def written_back(folder, every=0.05):
        writeback.append(threading.current_thread().name)
        return real_written_back(folder, every)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(wsfold.io.paths, "written_back", written_back)
    res = run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", out, "--json", *flag)
    assert res.exit_code == 0, res.stderr
    assert __import__("json").loads(res.stdout)["fsync"] is bool(flag)  # what the pipeline's log records
    assert wsfold.load_baked(out, arch=arch_spec("bit_tiny")) is not None
    if flag:
        assert len(synced) == 2 and len(writeback) == 1
        synced_path, placed_yet = synced[0]
        assert ".wsfold-" in synced_path and synced_path.endswith("out.safetensors") and not placed_yet
        assert synced[1] == (str(tmp_path), True)  # then the folder, for the new name
    else:
        assert synced == [] and writeback == []
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_failed_flush_names_the_output_exit_2_with_nothing_left(tmp_path, monkeypatch):
    """The disk refusing the fsync of --fsync is the system's refusal (exit 2), said with OUT's name."""
    import errno
    import os

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "bit.baked.safetensors"
    res = run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", out, "--fsync", "-q")
    assert res.exit_code == 2 and f"the system refused ({out})" in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_asks_torch_for_huge_pages_unless_told_otherwise(tmp_path):
    """Set before torch is imported, never over a value the environment already has."""
    from pathlib import Path

    probe = "import os, wsfold.cli as c; c._huge_pages_for_torch(); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    fresh = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    offered = mode.exists() and "[never]" not in mode.read_text()
    assert fresh.stdout.strip() == ("1" if offered else "None")
    told = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**env, "THP_MEM_ALLOC_ENABLE": "0"}
    )
    assert told.stdout.strip() == "0"


class _Saved(torch.nn.Module):
    """A module with what a pickled checkpoint holds: shared and strided storages, an empty tensor, integer and
    half buffers, a plain attribute."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 3)
        self.tied = self.conv  # the same module twice
        self.register_buffer("fp16", torch.randn(5, 7).half())
        self.register_buffer("count", torch.arange(11))
        self.register_buffer("empty", torch.empty(0, 3))
        self.register_buffer("strided", torch.randn(6, 4).t())
        self.note = {"formula": "V1", "eps": 1e-5}


def _records(path):
    import zipfile

    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC-32 is right
        return {i.filename.partition("/")[2]: z.read(i) for i in z.infolist()}


@pytest.mark.parametrize("zip64_at", [None, 100])
def test_a_pt_written_on_two_threads_holds_what_torch_save_writes(tmp_path, monkeypatch, zip64_at):
    """The records torch.save would write, byte for byte (the serialization id excepted), aligned, with right
    CRCs, loaded by torch.load with and without mmap; with ZIP64 fields too (forced on small sizes here)."""
    import zipfile

    from wsfold.artifacts import ptzip

    if zip64_at is not None:
        monkeypatch.setattr(ptzip, "_ZIP64_AT", zip64_at)
    torch.manual_seed(0)
    model = _Saved()
    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    ptzip.save_module(model, ours)
    torch.save(model, theirs)
    mine, reference = _records(ours), _records(theirs)
    assert mine.keys() == reference.keys()
    for name in reference:
        if name != ".data/serialization_id":
            assert mine[name] == reference[name], name
    assert len(mine[".data/serialization_id"]) == 40
    with zipfile.ZipFile(ours) as z:
        for info in z.infolist():
            if info.filename.partition("/")[2].startswith("data/"):
                with open(ours, "rb") as fh:  # the data offset from the local header
                    fh.seek(info.header_offset + 26)
                    name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
            zip64 = zip64_at is not None and max(info.file_size, info.header_offset) >= zip64_at
            assert info.extra[:2] == (b"\x01\x00" if zip64 else b"")
    for mmap in (False, True):
        loaded = torch.load(ours, weights_only=False, mmap=mmap)
        assert loaded.tied is loaded.conv and loaded.note == model.note
        for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key


def test_a_pt_is_written_by_torch_save_when_torchs_serializer_is_not_the_one_known(tmp_path, monkeypatch):
    from wsfold.artifacts import ptzip

    monkeypatch.setattr(ptzip, "_SAVE_PARAMS", ("obj", "zip_file"))  # as if torch's had another signature
    model = _Saved()
    ptzip.save_module(model, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False).conv.weight, model.conv.weight)


def test_a_failed_write_stops_both_threads_and_raises(tmp_path, monkeypatch):
    import errno
    import os
    import threading

    from wsfold.artifacts import ptzip

    monkeypatch.setattr(ptzip, "_CHUNK", 64)
    calls = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(ptzip.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space"):
        ptzip.save_module(_Saved(), tmp_path / "m.pt")
    count = len(calls)
    assert count <= 10  # of about 170: the other thread stopped at its next chunk instead of writing the rest
    assert not [t for t in threading.enumerate() if t.name.startswith("wsfold-save")]


def test_threads_that_share_work_have_all_ended_before_an_interruption_goes_on():
    """A stop signal while the work is shared out: every worker has ended (no further item taken, the running
    ones told to stop) before the exception reaches the caller, who may then close what they write to."""
    import signal
    import threading
    import time

    from wsfold.io.parallel import each_in_threads

    class Stopped(Exception):
        pass

    def handler(signum, frame):
        raise Stopped

    stop, busy, ended = threading.Event(), threading.Barrier(2), []

    def work(i):
        busy.wait(timeout=10)  # both workers are inside an item when the signal comes
        while not stop.is_set():
            time.sleep(0.005)
        time.sleep(0.05)  # still finishing its step after being told
        ended.append(i)

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        main = threading.main_thread().ident
        threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGUSR1)).start()
        with pytest.raises(Stopped):
            each_in_threads(work, list(range(6)), stop=stop, name="wsfold-test")
        assert sorted(ended) == [0, 1]
        assert not [t for t in threading.enumerate() if t.name == "wsfold-test"]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_threads_that_share_work_keep_the_items_order_and_raise_the_first_failure():
    from wsfold.io.parallel import each_in_threads

    assert each_in_threads(lambda x: x * x, [3, 1, 2], name="wsfold-test") == [9, 1, 4]

    def work(x):
        if x == 2:
            raise ValueError("item 2")
        return x

    with pytest.raises(ValueError, match="item 2"):
        each_in_threads(work, [1, 2, 3, 4], name="wsfold-test")


def test_a_file_size_limit_is_the_systems_refusal_exit_2_with_nothing_left(tmp_path, monkeypatch):
    import errno

    from wsfold.artifacts import ptzip

    def too_large(fd, data, offset):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(ptzip.os, "pwrite", too_large)
    out = tmp_path / "out.pt"
    res = run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", out, "-q")
    assert res.exit_code == 2 and "File too large" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


def test_inspect_of_a_baked_file_says_it_is_baked_not_an_empty_table_alone(tmp_path):
    import json

    out = tmp_path / "b.safetensors"
    assert run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", out, "-q").exit_code == 0
    res = run("inspect", out, "--arch", arch_spec("bit_tiny"), "--json")
    assert res.exit_code == 0, res.stderr
    payload = json.loads(res.stdout)
    assert payload["layers"] == []
    assert any("b.safetensors was written by wsfold bake (4 layer(s) baked" in n for n in payload["notes"])
    text = run("inspect", out, "--arch", arch_spec("bit_tiny"))
    assert "note b.safetensors was written by wsfold bake" in " ".join(text.stdout.split())


def test_export_of_a_baked_pt2_takes_the_input_shape_it_was_captured_with(tmp_path):
    """A .pt2 program fixes its inputs' shapes (the batch dynamic): export needs no --input-shape for it."""
    import onnx

    program = tmp_path / "v.pt2"
    res = run("bake", ckpt("variants"), "--arch", arch_spec("variants"), "-o", program, "--input-shape", "1,3,12,12")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "v.onnx"
    res = run("export", program, "--allow-pickle", "--onnx", out, "-q")
    assert res.exit_code == 0, res.stderr
    dims = onnx.load(str(out), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims][1:] == [3, 12, 12]
    assert not dims[0].dim_value  # the batch stays dynamic
