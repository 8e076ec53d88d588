from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import CATALOG, arch_spec, ckpt
from onnx import numpy_helper
from typer.testing import CliRunner

from wsfold.cli.app import app

BAKEABLE = sorted(n for n in CATALOG if not CATALOG[n].get("unsupported"))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def shape_of(name):
    return ",".join(str(d) for d in CATALOG[name]["input"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every bakeable fixture exported once by wsfold."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name in BAKEABLE:
        out = folder / f"{name}.onnx"
        result = run(
            "export", ckpt(name), "--arch", arch_spec(name), "--onnx", out, "--input-shape", shape_of(name), "-q"
        )
        assert result.exit_code == 0, result.stderr
        paths[name] = out
    return paths


def verify(name, onnx_path, *extra):
    return run(
        "verify", ckpt(name), "--arch", arch_spec(name), "--onnx", onnx_path, "--input-shape", shape_of(name), *extra
    )


@pytest.mark.parametrize("name", BAKEABLE)
def test_verify_passes_on_every_fixture_for_20_seeds(name, exported):
    result = verify(name, exported[name], "--samples", "20", "--seed", "100", "--json")
    assert result.exit_code == 0, result.stdout
    payload = json.loads(result.stdout)
    assert payload["passed"] is True and payload["samples"] == 20
    for out in payload["outputs"]:
        assert out["passed"] and out["onnx_vs_float64"] <= out["allowed"]
        assert set(out) >= {"name", "shape", "max_abs_error", "max_rel_error", "mean_abs_error", "passed"}


def _tamper(src, dst, edit):
    model = onnx.load(str(src))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    inits = {i.name: i for i in model.graph.initializer}
    edit(conv, inits)
    onnx.save(model, str(dst))
    return conv


def _scale_filter(conv, inits):
    w = numpy_helper.to_array(inits[conv.input[1]]).copy()
    w[1] *= 1.01
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w, conv.input[1]))


def _swap_filters(conv, inits):
    w = numpy_helper.to_array(inits[conv.input[1]]).copy()
    w[[0, 1]] = w[[1, 0]]
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w, conv.input[1]))


def _shift_bias(conv, inits):
    b = numpy_helper.to_array(inits[conv.input[2]]).copy()
    b[2] += 1e-3
    inits[conv.input[2]].CopyFrom(numpy_helper.from_array(b, conv.input[2]))


@pytest.mark.parametrize("edit", [_scale_filter, _swap_filters, _shift_bias])
def test_tampered_graph_fails_and_per_layer_names_the_layer(edit, exported, tmp_path):
    bad = tmp_path / "bad.onnx"
    _tamper(exported["variants"], bad, edit)
    result = verify("variants", bad, "--per-layer", "--json")
    assert result.exit_code == 1, result.stdout
    payload = json.loads(result.stdout)
    assert payload["passed"] is False and payload["cause"].startswith("the exported graph")
    failing = [layer["name"] for layer in payload["layers"] if not layer["passed"]]
    assert failing == ["0"]  # the first conv: StdConv2d at index 0
    human = verify("variants", bad, "--per-layer")
    assert human.exit_code == 1 and "layer 0:" in human.stdout and "verification failed" in human.stdout


def test_a_graph_only_the_runtime_optimizer_breaks_is_blamed_on_it(exported, monkeypatch):
    """When the graph fails with onnxruntime's optimizations on and passes with them off (onnxruntime up to 1.31
    miscompiled an unguarded Pad(0)+MaxPool so; simulated here, whatever the installed version does), verify
    fails, names the optimizer, and passes with --ort-opt-level disable."""
    import wsfold.verify.verification

    real = wsfold.verify.verification.ort_session

    class Optimized:
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, names, feed):
            return [o + 0.05 * np.abs(o).max() for o in self.session.run(names, feed)]

    def session(path, level="all"):
        made = real(path, level)
        return made if level == "disable" else Optimized(made)

    import wsfold.verify.runtimes.ort

    monkeypatch.setattr(wsfold.verify.verification, "ort_session", session)
    monkeypatch.setattr(wsfold.verify.runtimes.ort, "ort_session", session)  # the session the graph runs on
    result = verify("bit_tiny", exported["bit_tiny"], "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert "onnxruntime's graph optimizer" in payload["cause"] and "ORT_ENABLE_BASIC" in payload["hint"]
    assert verify("bit_tiny", exported["bit_tiny"], "--ort-opt-level", "disable").exit_code == 0


# torch's own export of the test's graph (not wsfold's) deep-copies a pytree spec that torch 2.13 deprecates.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_shape_clash_is_a_failure_naming_both_shapes(tmp_path):
    import models

    other = torch.nn.Sequential(models.variants(), torch.nn.Conv2d(4, 2, 1)).eval()
    path = tmp_path / "other.onnx"
    torch.onnx.export(
        other,
        (torch.randn(2, 3, 12, 12),),
        str(path),
        dynamo=True,
        input_names=["input"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=18,
        verbose=False,
    )
    result = verify("variants", path)
    assert result.exit_code == 1
    assert "shape [1, 2, 12, 12] in the ONNX graph vs [1, 4, 12, 12] in the checkpoint" in result.stdout
    # Said once (not once per batch), no row of zeros where nothing could be compared, and a hint to the cause.
    assert result.stdout.count("in the ONNX graph vs") == 1, result.stdout
    row = next(line for line in result.stdout.splitlines() if "FAIL" in line)
    assert row.split()[3:] == ["-"] * 6, row
    assert "check that --onnx was exported from this SOURCE" in " ".join(result.stdout.split())
    payload = json.loads(verify("variants", path, "--json").stdout)
    assert payload["outputs"][0]["compared"] is False and not payload["passed"]


def test_input_shape_that_does_not_fit_the_graph_is_an_input_error(exported):
    result = verify("variants", exported["functional_and_parametrized"])
    assert result.exit_code == 2
    assert "takes input 'input' of shape ['N', 3, 10, 10], not [1, 3, 12, 12]" in result.stderr


def test_nan_in_onnx_output_is_a_failure(exported, tmp_path):
    bad = tmp_path / "nan.onnx"

    def poison(conv, inits):
        b = numpy_helper.to_array(inits[conv.input[2]]).copy()
        b[0] = np.nan
        inits[conv.input[2]].CopyFrom(numpy_helper.from_array(b, conv.input[2]))

    _tamper(exported["variants"], bad, poison)
    result = verify("variants", bad)
    assert result.exit_code == 1 and "NaN/Inf in the ONNX output" in result.stdout


def test_missing_onnx_file_and_bad_inputs_exit_2(exported, tmp_path):
    missing = verify("variants", tmp_path / "nope.onnx")
    assert missing.exit_code == 2 and "no such ONNX file" in missing.stderr and len(missing.stderr.splitlines()) == 1
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((1, 3, 12, 12), np.float32))
    result = verify("variants", exported["variants"], "--inputs", wrong)
    assert result.exit_code == 2 and "no array named 'input'" in result.stderr and "it has: x" in result.stderr
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    assert verify("variants", exported["variants"], "--inputs", garbage).exit_code == 2
    level = verify("variants", exported["variants"], "--ort-opt-level", "max")
    assert level.exit_code == 2 and "--ort-opt-level" in level.stderr


def test_real_inputs_and_report_file(exported, tmp_path):
    good = tmp_path / "inputs.npz"
    np.savez(good, input=np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32))
    report = tmp_path / "report.json"
    result = verify("variants", exported["variants"], "--inputs", good, "--report", report, "-q")
    assert result.exit_code == 0 and result.stdout == ""
    payload = json.loads(report.read_text())
    assert payload["passed"] is True and payload["input_shapes"] == [[4, 3, 12, 12]]


def test_the_report_names_every_batch_and_the_shape_the_worst_error_is_in(exported):
    """A dynamic batch is checked at 1 and 3: each batch's input shapes are listed, and each output's shape is
    the one of the batch its worst_index points into."""
    result = verify("variants", exported["variants"], "--samples", "2", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    batches = payload["batch_input_shapes"]
    assert payload["input_shapes"] == batches[0]
    assert sorted({b[0][0] for b in batches}) == [1, 3], batches
    for out in payload["outputs"]:
        assert len(out["worst_index"]) == len(out["shape"])
        assert all(0 <= i < n for i, n in zip(out["worst_index"], out["shape"])), out
        assert out["shape"][0] in (1, 3)
    text = verify("variants", exported["variants"], "--samples", "2")
    assert text.exit_code == 0 and f"{len(batches)} batch(es) of inputs 1x3x" in text.stdout, text.stdout


def test_allclose_rule_with_atol_rtol(exported):
    strict = verify("variants", exported["variants"], "--atol", "0", "--rtol", "0", "--json")
    # This chain of nine WS layers amplifies float32 noise to ~0.02 absolute on outputs of ~60.
    loose = verify("variants", exported["variants"], "--atol", "0.1", "--rtol", "2e-3", "--json")
    assert json.loads(loose.stdout)["criterion"].startswith("allclose(atol=0.1, rtol=0.002")
    assert loose.exit_code == 0
    assert strict.exit_code == 1  # float32 kernels differ from PyTorch's in the last bits


def test_widened_on_call_computes_what_a_float64_copy_computes_and_puts_every_tensor_back():
    import copy

    from wsfold.bake.modeltree import structural_copy, widened_on_call

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)
    ).eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    expected = copy.deepcopy(model).double()(x)
    private = structural_copy(model)
    before = {k: (v.dtype, v.data_ptr()) for k, v in private.state_dict().items()}
    widest = []
    with torch.no_grad(), widened_on_call(private):
        probe = private[3].register_forward_pre_hook(  # runs after the widening hook
            lambda m, a: widest.append(sum(t.dtype == torch.float64 for t in private.state_dict().values()))
        )
        got = private(x)
    probe.remove()
    assert torch.equal(got, expected)
    assert widest == [2]  # while the last conv runs, its weight and bias are float64, not all 8 of the model
    assert {k: (v.dtype, v.data_ptr()) for k, v in private.state_dict().items()} == before


class _ReadsAnotherModulesWeight(torch.nn.Module):
    """The head is never called: forward reads its weight directly (as tied-embedding decoders do)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return torch.nn.functional.linear(y, self.head.weight, self.head.bias)


def test_verify_widens_a_whole_copy_when_the_model_reads_another_modules_weight(tmp_path):
    import wsfold

    torch.manual_seed(0)
    model = _ReadsAnotherModulesWeight().eval()
    prepared = wsfold.prepare(model)
    out = tmp_path / "m.onnx"
    wsfold.export_onnx(prepared, out, input_shapes=["1,3,8,8"])
    result = wsfold.verify_onnx(prepared, out, input_shapes=[(1, 3, 8, 8)])
    assert result.passed, result
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())


@pytest.mark.parametrize("layout", ["single", "external", "resaved"])
def test_a_graph_read_without_its_weights_has_every_initializer_onnx_reads(exported, tmp_path, layout):
    """The per-layer check reads a graph's structure only; each weight, embedded or external, is read when it is
    compared and equals what onnx.load gives. Small embedded tensors stay in the proto. "resaved": onnx.save of
    a graph loaded from external data writes data_location DEFAULT after raw_data, which must not win."""
    from wsfold.onnx.store import is_external, load_without_weights, to_array

    path = exported["bit_tiny"]
    external = layout == "external"
    if layout != "single":
        model = onnx.load(str(path))
        path = tmp_path / "ext.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=256)
    if layout == "resaved":
        model = onnx.load(str(path))
        path = tmp_path / "resaved.onnx"
        onnx.save(model, str(path))
    full = onnx.load(str(path))
    light = load_without_weights(path)
    assert light.ByteSize() < full.ByteSize()
    assert light.graph.node == full.graph.node and light.metadata_props == full.metadata_props
    assert [t.name for t in light.graph.initializer] == [t.name for t in full.graph.initializer]
    for a, b in zip(light.graph.initializer, full.graph.initializer):
        assert np.array_equal(to_array(a, path.parent), numpy_helper.to_array(b)), a.name
        if not external:
            assert is_external(a) == (len(b.raw_data) >= 1024)


def test_a_damaged_graph_is_refused_by_the_light_reader_with_a_value_error(exported, tmp_path):
    from wsfold.onnx.store import load_without_weights

    data = exported["bit_tiny"].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_without_weights(cut)


@pytest.mark.parametrize("kind", ["missing", "empty", "folder", "checkpoint"])
def test_an_onnx_that_is_not_one_is_said_before_source_is_loaded(tmp_path, monkeypatch, kind):
    import wsfold.cli.app

    onnx_path = {"missing": tmp_path / "nope.onnx", "empty": tmp_path / "empty.onnx"}.get(kind, tmp_path / "x.onnx")
    if kind == "empty":
        onnx_path.write_bytes(b"")
    elif kind == "folder":
        onnx_path.mkdir()
    elif kind == "checkpoint":
        onnx_path = ckpt("bit_tiny")  # a safetensors file passed as the graph

    def never(*args, **kwargs):
        raise AssertionError("SOURCE was loaded before --onnx was checked")

    monkeypatch.setattr(wsfold.cli.app, "_prepare", never)
    result = run("verify", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "--onnx", onnx_path, "-q")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    expected = {"missing": "no such ONNX file", "empty": "holds no ONNX graph", "folder": "is not a file"}
    assert expected.get(kind, "is not an ONNX model") in result.stderr and str(onnx_path) in result.stderr
