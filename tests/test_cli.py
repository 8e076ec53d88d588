from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CATALOG, CKPT, ROOT, arch_spec, ckpt
from typer.testing import CliRunner

from wsfold.cli.app import app


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsfold: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_inspect_json_names_exactly_the_ws_layers(name):
    result = run("inspect", ckpt(name), "--arch", arch_spec(name), "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["source"] == str(ckpt(name))
    got = {layer["name"]: (layer["formula"], layer["eps"]) for layer in payload["layers"]}
    assert got.keys() == CATALOG[name]["layers"].keys()
    for key, (formula, eps) in CATALOG[name]["layers"].items():
        assert got[key][0] == formula and got[key][1] == pytest.approx(eps, rel=1e-9)
    for layer in payload["layers"]:
        assert isinstance(layer["fan_in"], int) and isinstance(layer["warnings"], list) and layer["op"]
    assert {u["name"] for u in payload["unsupported"]} == CATALOG[name].get("unsupported", set())


def test_inspect_human_output_has_table_and_summary():
    result = run("inspect", ckpt("variants"), "--arch", arch_spec("variants"))
    assert result.exit_code == 0
    assert "ConvAWS2d" in result.stdout and "V8" in result.stdout
    assert "9 derived-weight layer(s)" in result.stdout


def test_bake_json_and_output(tmp_path):
    out = tmp_path / "v.safetensors"
    result = run("bake", ckpt("variants"), "--arch", arch_spec("variants"), "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["output"] == str(out) and len(payload["layers"]) == 9
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        manifest = json.loads(fh.metadata()["wsfold"])
        keys = set(fh.keys())
    assert manifest["wsfold_version"] and len(manifest["layers"]) == 9
    aws = next(entry for entry in manifest["layers"] if entry["type"] == "ConvAWS2d")
    assert aws["formula"] == "V8" and aws["from"] == "9.weight" and aws["weight"] == "9.weight"
    assert not any(k.endswith(("gain", "weight_gamma", "weight_beta")) for k in keys)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp file left


def test_bake_default_output_is_beside_source(tmp_path):
    src = tmp_path / "model.pt"
    shutil.copy(ckpt("unsupported"), src)
    result = run("bake", src, "--arch", arch_spec("unsupported"), "-q")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "model.baked.safetensors").exists() and result.stdout == ""
    # The stem, not the text before the first dot: two versions of one model do not meet in one name.
    for version in ("v1", "v2"):
        named = tmp_path / f"my.model.{version}.pt"
        shutil.copy(ckpt("unsupported"), named)
        assert run("bake", named, "--arch", arch_spec("unsupported"), "-q").exit_code == 0
        assert (tmp_path / f"my.model.{version}.baked.safetensors").exists()


def test_bake_safetensors_roundtrip_matches_original(tmp_path):
    from wsfold.load.checkpoint import load_model

    out = tmp_path / "bit.safetensors"
    assert run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", out, "-q").exit_code == 0
    baked = load_model(out, arch=arch_spec("bit_tiny")).model
    original = load_model(ckpt("bit_tiny"), arch=arch_spec("bit_tiny")).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), original(x), rtol=0, atol=1e-5 * original(x).abs().max().item())


def test_training_checkpoint_state_key(tmp_path):
    result = run("inspect", ckpt("dims"), "--arch", arch_spec("dims"), "--state-key", "model_state_dict", "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["layers"]) == 5
    bad = run("inspect", ckpt("dims"), "--arch", arch_spec("dims"), "--state-key", "nope")
    assert_one_line_error(bad, 2, "--state-key 'nope'", "model_state_dict")


def test_allow_pickle_loads_a_whole_module():
    env_path = str(ROOT / "fixtures")
    sys.path.insert(0, env_path)
    result = run("inspect", CKPT / "bit_tiny_module.pt", "--allow-pickle", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"]) == 4


# --- bad input: exit 2, one line, no output file, input untouched ------------------------------------------------
def _bad_sources(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    data = ckpt("variants").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    trunc_st = tmp_path / "trunc.safetensors"
    st = ckpt("bit_tiny").read_bytes()
    trunc_st.write_bytes(st[: len(st) // 3])
    return {
        "missing": (tmp_path / "nope.pt", [], "no such file"),
        "empty": (empty, [], "is empty"),
        "truncated": (truncated, [], "truncated or corrupt"),
        "truncated_safetensors": (trunc_st, [], "not a valid safetensors"),
        "not_a_checkpoint": (text, [], "not a PyTorch checkpoint"),
        "pickle": (CKPT / "bit_tiny_module.pt", [], "--allow-pickle"),
        "no_arch": (ckpt("variants"), [], "--arch"),
        "wrong_arch": (ckpt("variants"), ["--arch", arch_spec("dims")], "does not fit"),
        "arch_missing_module": (ckpt("variants"), ["--arch", "no_such_pkg.models:net"], "cannot import"),
        "arch_bad_kwargs": (
            ckpt("variants"),
            ["--arch", arch_spec("variants"), "--arch-kwargs", "{bad"],
            "not valid JSON",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "truncated",
        "truncated_safetensors",
        "not_a_checkpoint",
        "pickle",
        "no_arch",
        "wrong_arch",
        "arch_missing_module",
        "arch_bad_kwargs",
    ],
)
def test_bad_input_exit_2_one_line_no_output(tmp_path, case):
    src, extra, needle = _bad_sources(tmp_path)[case]
    before = src.read_bytes() if src.exists() else None
    out = tmp_path / "out" / "baked.pt"
    out.parent.mkdir()
    result = run("bake", src, *extra, "-o", out)
    assert_one_line_error(result, 2, needle)
    assert list(out.parent.iterdir()) == []
    assert (src.read_bytes() if src.exists() else None) == before
    assert_one_line_error(run("inspect", src, *extra), 2, needle)


def test_wrong_arch_lists_missing_and_unexpected_keys():
    result = run("inspect", ckpt("variants"), "--arch", arch_spec("dims"))
    assert_one_line_error(result, 2, "missing: ", "unexpected: ")


def test_existing_output_is_refused_without_force(tmp_path):
    out = tmp_path / "baked.pt"
    out.write_bytes(b"keep me")
    assert_one_line_error(
        run("bake", ckpt("variants"), "--arch", arch_spec("variants"), "-o", out), 2, "already exists", "--force"
    )
    assert out.read_bytes() == b"keep me"
    assert run("bake", ckpt("variants"), "--arch", arch_spec("variants"), "-o", out, "--force", "-q").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_output_equal_to_source_is_refused_even_with_force(tmp_path):
    src = tmp_path / "m.pt"
    shutil.copy(ckpt("variants"), src)
    before = src.read_bytes()
    assert_one_line_error(run("bake", src, "--arch", arch_spec("variants"), "-o", src, "--force"), 2, "SOURCE itself")
    assert src.read_bytes() == before


def test_unknown_output_suffix(tmp_path):
    assert_one_line_error(
        run("bake", ckpt("variants"), "--arch", arch_spec("variants"), "-o", tmp_path / "x.onnx"),
        2,
        "unknown output format",
    )


def test_unpicklable_model_names_safetensors(tmp_path):
    src = tmp_path / "closure.pt"
    torch.save(__import__("models").closure().state_dict(), src)
    out = tmp_path / "closure.baked.pt"
    result = run("bake", src, "--arch", f"{ROOT / 'fixtures' / 'models.py'}:closure", "-o", out)
    assert_one_line_error(result, 2, "cannot be pickled", ".safetensors")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["closure.pt"]
    ok = run(
        "bake", src, "--arch", f"{ROOT / 'fixtures' / 'models.py'}:closure", "-o", tmp_path / "c.safetensors", "-q"
    )
    assert ok.exit_code == 0


def test_internal_error_exit_3_without_traceback(monkeypatch):
    import wsfold.bake.detect

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(wsfold.bake.detect._Prober, "analyse", boom)
    result = run("inspect", ckpt("variants"), "--arch", arch_spec("variants"))
    assert result.exit_code == 3
    assert "internal error: RuntimeError: simulated bug" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.setenv("WSFOLD_DEBUG", "1")
    assert "Traceback" in run("inspect", ckpt("variants"), "--arch", arch_spec("variants")).stderr


def test_usage_error_is_exit_2():
    assert run("bake").exit_code == 2
    assert run("inspect", ckpt("variants"), "--no-such-flag").exit_code == 2


def test_subprocess_smoke():
    proc = subprocess.run(
        [sys.executable, "-m", "wsfold", "inspect", str(ckpt("bit_tiny")), "--arch", arch_spec("bit_tiny"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["layers"]) == 4
    assert proc.stderr == ""


def test_bake_to_an_onnx_name_points_to_export(tmp_path):
    from conftest import arch_spec, ckpt

    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["bake", str(ckpt("bit_tiny")), "--arch", arch_spec("bit_tiny"), "-o", str(out)])
    assert result.exit_code == 2 and "wsfold export --onnx" in result.stderr and not out.exists()
