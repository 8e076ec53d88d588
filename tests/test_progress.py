"""Progress bars: on stderr when it is a terminal (or with --progress), never on stdout, never with --json/--quiet."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest
from conftest import ROOT, arch_spec, ckpt


def run_with_tty_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run wsfold with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsfold", *args], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    stdout = proc.stdout.read().decode()
    code = proc.wait(timeout=300)
    os.close(master)
    return code, stdout, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_progress_on_a_terminal_and_clean_json(tmp_path):
    base = [str(ckpt("bit_tiny")), "--arch", arch_spec("bit_tiny")]
    onnx_path = str(tmp_path / "b.onnx")
    code, stdout, stderr = run_with_tty_stderr(["bake", *base, "-o", str(tmp_path / "b.pt")])
    assert code == 0 and "load bit_tiny" in stderr and "probe layers" in stderr  # bars on the terminal
    assert "probe layers" not in stdout
    commands = [
        ["inspect", *base],
        ["bake", *base, "-o", str(tmp_path / "c.pt"), "--force"],
        ["export", *base, "--onnx", onnx_path, "--force"],
        ["verify", *base, "--onnx", onnx_path],
    ]
    for i, command in enumerate(commands):
        # --json alone on the first command; --json with --progress (the stricter case) on every one.
        for extra in (["--json"], ["--json", "--progress"]) if i == 0 else (["--json", "--progress"],):
            code, stdout, stderr = run_with_tty_stderr(command + extra)
            assert code == 0, (command, stderr)
            json.loads(stdout)  # stdout holds one JSON object and nothing else
            assert "probe" not in stderr, (command, extra)  # --json silences progress, even with --progress


def test_progress_flag_without_a_terminal_and_quiet(tmp_path):
    base = [str(ckpt("bit_tiny")), "--arch", arch_spec("bit_tiny")]
    forced = subprocess.run(
        [sys.executable, "-m", "wsfold", "inspect", *base, "--progress"], capture_output=True, text=True, cwd=ROOT
    )
    assert forced.returncode == 0 and "probe layers" in forced.stderr
    plain = subprocess.run([sys.executable, "-m", "wsfold", "inspect", *base], capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 0 and plain.stderr == ""
    quiet = subprocess.run(
        [sys.executable, "-m", "wsfold", "bake", *base, "-o", str(tmp_path / "q.pt"), "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
