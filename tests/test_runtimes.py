"""verify on the runtime you deploy: OpenVINO beside onnxruntime, judged by the same rule at the precision it
really computes in (read back from the runtime), refusals before any work."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import CATALOG, FIXTURES, arch_spec, ckpt
from onnx import numpy_helper
from typer.testing import CliRunner

from wsfold.cli.app import app

ov = pytest.importorskip("openvino")  # in the test extra: CI runs these

NAME = "bit_tiny"
SHAPE = ",".join(map(str, CATALOG[NAME]["input"]))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def verify(graph, *extra):
    return run("verify", ckpt(NAME), "--arch", arch_spec(NAME), "--onnx", graph, "--input-shape", SHAPE, *extra)


def cpu_default_precision() -> str:
    """What OpenVINO picks on this CPU without being told: bf16 where the CPU computes it natively."""
    return "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "bit.onnx"
    assert (
        run("export", ckpt(NAME), "--arch", arch_spec(NAME), "--onnx", out, "--input-shape", SHAPE, "-q").exit_code == 0
    )
    return out


def test_both_runtimes_pass_and_report_the_precision_they_ran_at(graph):
    result = verify(graph, "--runtime", "onnxruntime", "--runtime", "openvino", "--json")
    assert result.exit_code == 0, result.stdout
    payload = json.loads(result.stdout)
    assert payload["passed"] is True
    runs = {r["runtime"]: r for r in payload["runtimes"]}
    assert set(runs) == {"onnxruntime", "openvino"} and all(r["passed"] for r in runs.values())
    assert runs["onnxruntime"]["precision"] == "f32"
    assert runs["openvino"]["precision"] == cpu_default_precision()
    assert runs["openvino"]["version"] == ov.__version__.split("-")[0]
    # The same inputs, dynamic batch included, for both; the per-layer check ran once.
    assert len(runs["openvino"]["outputs"]) == len(runs["onnxruntime"]["outputs"]) == 1
    assert len(payload["batch_input_shapes"]) == 6 and len({layer["tensor"] for layer in payload["layers"]}) == len(
        payload["layers"]
    )
    if cpu_default_precision() == "bf16":
        assert any("OpenVINO ran in bf16 here" in w and "--precision f32" in w for w in payload["warnings"])
        human = verify(graph, "--runtime", "openvino")
        assert "openvino" in human.stdout and "bf16" in human.stdout and "--precision f32" in human.stdout


def test_precision_f32_is_asked_for_and_read_back(graph):
    result = verify(graph, "--runtime", "openvino", "--precision", "f32", "--json")
    assert result.exit_code == 0, result.stdout
    run_ = json.loads(result.stdout)["runtimes"][0]
    assert run_["precision"] == "f32" and run_["note"] is None
    out = run_["outputs"][0]
    assert out["onnx_vs_float64"] <= out["allowed"] < 1e-4  # held to the f32 rule


def _scale_filter(src, dst):
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w = numpy_helper.to_array(inits[conv.input[1]]).copy()
    w[1] *= 1.01
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w, conv.input[1]))
    onnx.save(model, str(dst))


def test_a_1pct_change_to_one_filter_fails_on_openvino(graph, tmp_path):
    bad = tmp_path / "bad.onnx"
    _scale_filter(graph, bad)
    at_f32 = verify(bad, "--runtime", "openvino", "--precision", "f32", "--json")
    assert at_f32.exit_code == 1
    payload = json.loads(at_f32.stdout)
    assert payload["runtimes"][0]["passed"] is False  # the outputs show it at f32
    assert [layer["name"] for layer in payload["layers"] if not layer["passed"]] == ["0"]
    # At OpenVINO's own precision the per-layer check still holds the weights exactly: the graph fails.
    default = verify(bad, "--runtime", "openvino", "--json")
    assert default.exit_code == 1 and not json.loads(default.stdout)["passed"]


def test_a_dynamic_size_graph_runs_on_openvino_at_both_sizes(tmp_path):
    import models
    import torch

    src = tmp_path / "u.pt"
    torch.save(models.diffusion_unet().state_dict(), src)
    spec = f"{FIXTURES / 'models.py'}:diffusion_unet"
    out = tmp_path / "u.onnx"
    exported = run(
        "export", src, "--arch", spec, "--onnx", out, "--input-shape", "1,3,16,16", "--input-shape", "1",
        "--input-dtype", "float32", "--input-dtype", "int64", "--dynamic-hw", "-q",
    )  # fmt: skip
    assert exported.exit_code == 0, exported.stderr
    result = run("verify", src, "--arch", spec, "--onnx", out, "--runtime", "openvino", "--precision", "f32", "--json")
    assert result.exit_code == 0, result.stdout
    payload = json.loads(result.stdout)
    assert {tuple(s[0]) for s in payload["batch_input_shapes"]} >= {(1, 3, 16, 16), (3, 3, 18, 18)}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runtime", "tvm"], "--runtime 'tvm' is not one of onnxruntime, openvino, tensorrt"),
        (["--runtime", "tensorrt"], "--runtime tensorrt: this machine has no TensorRT"),
        (["--precision", "f8"], "--precision 'f8' is not one of f32, bf16, f16"),
        (["--precision", "bf16"], "onnxruntime's CPU provider computes this graph in f32 only"),
    ],
)
def test_refusals_are_exit_2_with_one_line_and_nothing_written(graph, tmp_path, args, message):
    report = tmp_path / "r.json"
    result = verify(graph, *args, "--report", report)
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not report.exists()


def test_a_precision_openvino_cannot_compute_here_is_exit_2(graph):
    if "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU computes f16 natively")
    result = verify(graph, "--runtime", "openvino", "--precision", "f16")
    assert result.exit_code == 2 and "OpenVINO on this CPU does not compute in f16" in result.stderr


def test_openvino_not_installed_says_which_extra(graph, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    result = verify(graph, "--runtime", "openvino")
    assert result.exit_code == 2 and "pip install 'wsfold[openvino]'" in result.stderr


def test_the_python_api_takes_runtimes(graph):
    import wsfold

    prepared = wsfold.prepare(ckpt(NAME), arch=arch_spec(NAME))
    result = wsfold.verify_onnx(prepared, graph, runtimes=["openvino"], precision="f32", input_shapes=[(1, 3, 32, 32)])
    assert result and [r.runtime for r in result.runtimes] == ["openvino"] and result.runtimes[0].precision == "f32"


def test_openvino_named_before_onnxruntime(graph):
    """onnxruntime runs first on the session verify opened, whatever the order; the report keeps the order asked."""
    result = verify(graph, "--runtime", "openvino", "--runtime", "onnxruntime", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert [r["runtime"] for r in json.loads(result.stdout)["runtimes"]] == ["openvino", "onnxruntime"]
