"""The docs never go stale: the command reference is generated from the CLI itself, README stays short and its
links resolve, and the wheel installs and runs from a fresh venv."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = [sys.executable, "-m", "typer", "wsfold.cli.app", "utils", "docs", "--name", "wsfold", "--title",
              "wsfold command reference"]  # fmt: skip


def test_the_command_reference_is_what_the_cli_says(tmp_path):
    """Regenerate with: .venv/bin/typer wsfold.cli.app utils docs --name wsfold --title "wsfold command reference"
    --output docs/commands.md"""
    out = tmp_path / "commands.md"
    subprocess.run([*REGENERATE, "--output", str(out)], check=True, cwd=ROOT, capture_output=True)
    assert out.read_text() == (ROOT / "docs" / "commands.md").read_text(), "docs/commands.md is stale: regenerate it"


def test_the_reference_names_every_option_of_every_command():
    from typer.main import get_command

    from wsfold.cli.app import app

    text = (ROOT / "docs" / "commands.md").read_text()
    group = get_command(app)
    for name, command in group.commands.items():
        assert f"## `wsfold {name}`" in text
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("-"):
                    assert f"`{opt}" in text or f", {opt}" in text, (name, opt)


def test_readme_is_short_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000
    assert readme.count("```bash") == 3  # install, the demo, the tests
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)


@pytest.mark.slow
def test_the_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    import shutil

    # Built from a copy of the tracked files: setuptools never cleans build/lib, so a build in the work tree can
    # ship modules deleted since (and would write into build/, where the demo writes its outputs).
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("wsfold-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
    # --version needs neither torch nor onnx: the wheel alone, with the CLI's own two packages.
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True)
    subprocess.run([*pip, "typer", "rich"], check=True, capture_output=True)
    version = subprocess.run([str(env / "bin" / "wsfold"), "--version"], capture_output=True, text=True)
    import wsfold

    assert version.returncode == 0 and version.stdout.strip() == f"wsfold {wsfold.__version__}", version.stderr
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "wsfold/py.typed" in names and "wsfold/verify/runtimes/openvino.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_a_missing_dependency_is_the_environments_not_a_bug(tmp_path):
    """A wheel installed with --no-deps has no torch: exit 2 saying what to install, not 'a bug in wsfold'."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['wsfold', 'inspect', 'x.pt']; "
        "from wsfold.cli import main; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "'torch' that wsfold needs is not installed" in result.stderr and "pip install torch" in result.stderr
