"""Inputs real models need: several inputs, integer timesteps, names from forward, value ranges, a cast dtype."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURES, scale_one_filter
from typer.testing import CliRunner

from wsfold.cli.app import app

ARCH = f"{FIXTURES / 'models.py'}:unet_tiny"
TWO_INPUTS = ("--input-shape", "2,3,16,16", "--input-shape", "2", "--input-dtype", "float32", "--input-dtype", "int64")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def unet(tmp_path):
    from models import unet_tiny

    src = tmp_path / "unet.pt"
    torch.save(unet_tiny().state_dict(), src)
    return src


def test_two_inputs_with_an_int64_timestep_export_named_after_forward_and_verify(unet, tmp_path):
    out = tmp_path / "unet.onnx"
    res = run("export", unet, "--arch", ARCH, "--onnx", out, *TWO_INPUTS, "--json")
    assert res.exit_code == 0, res.stderr
    assert [i["name"] for i in json.loads(res.stdout)["inputs"]] == ["x", "time"]
    graph = onnx.load(str(out)).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types == {"x": onnx.TensorProto.FLOAT, "time": onnx.TensorProto.INT64}
    res = run(
        "verify", unet, "--arch", ARCH, "--onnx", out, "--input-range", "-1,1", "--input-range", "0,1000", "--json"
    )
    assert res.exit_code == 0, res.stdout[-3000:]
    payload = json.loads(res.stdout)
    assert payload["passed"] and all(layer["passed"] for layer in payload["layers"])


def test_input_names_can_be_given_and_must_fit(unet, tmp_path):
    out = tmp_path / "named.onnx"
    res = run("export", unet, "--arch", ARCH, "--onnx", out, *TWO_INPUTS, "--input-name", "image", "--input-name", "t")
    assert res.exit_code == 0, res.stderr
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["image", "t"]
    res = run("export", unet, "--arch", ARCH, "--onnx", tmp_path / "bad.onnx", *TWO_INPUTS, "--input-name", "a")
    assert res.exit_code == 2 and "--input-name" in res.stderr


def test_verify_samples_integers_in_the_given_range(unet, tmp_path):
    """Timesteps drawn in [0, 1000) reach rows of the embedding that N(0, 1) samples never would."""
    from wsfold.inputs import ValueRange, random_array

    rng = np.random.default_rng(0)
    t = random_array([4096], np.int64, rng, ValueRange(0, 1000))
    assert t.dtype == np.int64 and t.min() >= 0 and t.max() <= 999 and t.max() > 900
    x = random_array([4096], np.float32, rng, ValueRange(-1, 1))
    assert -1 <= x.min() and x.max() < 1
    assert random_array([8], np.int64, rng).max() < 10  # default range [0, 10)


def test_dynamic_hw_verify_uses_a_second_size_the_model_accepts(unet, tmp_path):
    """The U-Net takes even sizes only: H+1 x W+1 is refused by the model, so verify picks H+2 x W+2."""
    out = tmp_path / "dyn.onnx"
    assert run("export", unet, "--arch", ARCH, "--onnx", out, *TWO_INPUTS, "--dynamic-hw", "-q").exit_code == 0
    res = run(
        "verify",
        unet,
        "--arch",
        ARCH,
        "--onnx",
        out,
        "--input-shape",
        "1,3,16,16",
        "--input-shape",
        "1",
        "--input-range",
        "-1,1",
        "--input-range",
        "0,1000",
        "--samples",
        "1",
        "--json",
    )
    assert res.exit_code == 0, res.stdout[-3000:] + res.stderr
    assert (
        run(
            "verify",
            unet,
            "--arch",
            ARCH,
            "--onnx",
            out,
            "--input-shape",
            "1,3,16,16",
            "--input-shape",
            "1",
            "--samples",
            "1",
            "--report",
            tmp_path / "r.json",
        ).exit_code
        == 0
    )
    shapes = {tuple(json.loads((tmp_path / "r.json").read_text())["input_shapes"][0])}
    assert shapes == {(1, 3, 16, 16)}


@pytest.mark.parametrize(
    "option,value",
    [("--input-dtype", "int8"), ("--dtype", "int64"), ("--dtype", "float8"), ("--input-range", "5,1")],
)
def test_bad_input_options_are_exit_2(unet, tmp_path, option, value):
    command = "verify" if option == "--input-range" else "export"
    args = [command, unet, "--arch", ARCH, "--onnx", tmp_path / "x.onnx", option, value]
    res = run(*args, *TWO_INPUTS[:4]) if command == "export" else run(*args)
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    assert res.stderr.startswith("wsfold: error:") and option in res.stderr
    if option == "--dtype":  # the same message for any value that is not a float dtype it casts to
        text = " ".join(res.stderr.split())
        assert f"--dtype {value!r} is not a floating dtype wsfold casts to" in text
        assert "use one of float32, float16, bfloat16, float64" in text, text


def test_float16_export_of_a_float32_checkpoint_verifies_and_a_1pct_filter_change_fails(unet, tmp_path):
    out = tmp_path / "half.onnx"
    res = run(
        "export",
        unet,
        "--arch",
        ARCH,
        "--onnx",
        out,
        *TWO_INPUTS[:4],
        "--input-dtype",
        "float16",
        "--input-dtype",
        "int64",
        "--dtype",
        "float16",
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    graph = onnx.load(str(out)).graph
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input}["x"] == onnx.TensorProto.FLOAT16
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer if len(i.dims) == 4)
    common = ("--arch", ARCH, "--input-range", "-1,1", "--input-range", "0,1000", "--json")
    res = run("verify", unet, "--onnx", out, *common)
    assert res.exit_code == 0, res.stdout[-3000:]
    assert "float16" in json.loads(res.stdout)["reference"]
    bad = tmp_path / "bad.onnx"
    scale_one_filter(out, bad)
    res = run("verify", unet, "--onnx", bad, *common)
    assert res.exit_code == 1, res.stdout[-3000:]
    assert [layer["name"] for layer in json.loads(res.stdout)["layers"] if not layer["passed"]] == ["inp"]


def test_float16_weights_are_rounded_once_from_float64(unet):
    """The cast model's standardized weight is the float64 formula rounded once to float16."""
    import wsfold
    from wsfold.bake.formulas import standardize

    prepared = wsfold.prepare(unet, arch=ARCH, dtype=torch.float16)
    original = prepared.original
    layer = next(layer for layer in prepared.detection.layers if layer.name == "inp")
    exact = standardize(original.inp.weight, layer.formula)
    assert prepared.model.inp.weight.dtype == torch.float16
    torch.testing.assert_close(prepared.model.inp.weight, exact.to(torch.float16), rtol=0, atol=0)


def test_a_layer_the_model_never_calls_is_not_compared_per_layer(tmp_path):
    arch = tmp_path / "spare.py"
    arch.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = torch.nn.Conv2d(3, 8, 3)\n"
        "        self.b = torch.nn.Conv2d(8, 8, 3)\n"
        "        self.spare = torch.nn.Conv2d(8, 8, 3)  # built, never called\n"
        "    def forward(self, x):\n"
        "        return self.b(torch.relu(self.a(x)))\n"
    )
    import runpy

    torch.manual_seed(0)
    src = tmp_path / "spare.pt"
    torch.save(runpy.run_path(str(arch))["M"]().state_dict(), src)
    out = tmp_path / "spare.onnx"
    common = ("--arch", f"{arch}:M", "--input-shape", "1,3,8,8")
    assert run("export", src, "--onnx", out, *common, "-q").exit_code == 0
    res = run("verify", src, "--onnx", out, *common, "--json")
    assert res.exit_code == 0, res.stdout[-2000:]
    assert {layer["name"] for layer in json.loads(res.stdout)["layers"]} == {"a", "b"}


@pytest.mark.parametrize("name,dtype", [("bit_tiny", "bfloat16"), ("half", "float32"), ("half", "bfloat16")])
def test_dtype_exports_verify_against_the_precision_they_were_rounded_to(tmp_path, name, dtype):
    from conftest import CATALOG, arch_spec, ckpt

    out = tmp_path / "cast.onnx"
    shape = ",".join(map(str, CATALOG[name]["input"]))
    res = run("export", ckpt(name), "--arch", arch_spec(name), "--onnx", out, "--input-shape", shape, "--dtype", dtype)
    assert res.exit_code == 0, res.stderr
    res = run("verify", ckpt(name), "--arch", arch_spec(name), "--onnx", out, "--input-shape", shape, "--json")
    assert res.exit_code == 0, res.stdout[-2000:]
    bad = tmp_path / "bad.onnx"
    scale_one_filter(out, bad, 1.05)
    res = run("verify", ckpt(name), "--arch", arch_spec(name), "--onnx", bad, "--input-shape", shape, "--json")
    assert res.exit_code == 1, res.stdout[-2000:]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (("--input-range", "-1,1", "--input-range", "0,1e30"), "does not fit"),
        (("--input-range", "-1e39,0", "--input-range", "0,10"), "does not fit"),
        (("--input-range", "0,1e30", "--input-range", "0,10"), "NaN/inf"),
        (("--samples", "100000000000"), "--samples"),
    ],
)
def test_verify_inputs_that_prove_nothing_are_exit_2(unet, tmp_path, extra, needle):
    out = tmp_path / "m.onnx"
    assert run("export", unet, "--arch", ARCH, "--onnx", out, *TWO_INPUTS, "-q").exit_code == 0
    res = run("verify", unet, "--arch", ARCH, "--onnx", out, *extra)
    assert res.exit_code == 2, (res.exit_code, res.stdout[-1500:], res.stderr)
    assert needle in res.stderr and "bug" not in res.stderr


def test_huge_input_shape_and_an_input_named_like_an_output_are_exit_2(unet, tmp_path):
    res = run(
        "export",
        unet,
        "--arch",
        ARCH,
        "--onnx",
        tmp_path / "m.onnx",
        "--input-shape",
        "2,3,99999999,99999",
        "--input-shape",
        "2",
        "--input-dtype",
        "float32",
        "--input-dtype",
        "int64",
    )
    assert res.exit_code == 2 and "--input-shape" in res.stderr, res.stderr
    res = run(
        "export",
        unet,
        "--arch",
        ARCH,
        "--onnx",
        tmp_path / "m.onnx",
        *TWO_INPUTS,
        "--input-name",
        "output",
        "--input-name",
        "t",
    )
    assert res.exit_code == 2 and "output" in res.stderr, res.stderr
    assert list(tmp_path.glob("*.onnx")) == []
