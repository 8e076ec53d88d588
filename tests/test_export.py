from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import CATALOG, OUT_TOL, arch_spec, ckpt, fixture_input, load_fixture, rel_err
from typer.testing import CliRunner

from wsfold.bake.baker import bake_model
from wsfold.cli.app import app
from wsfold.onnx.graph import audit_graph, count_ops

BAKEABLE = sorted(n for n in CATALOG if not CATALOG[n].get("unsupported"))


@pytest.fixture(params=["dynamo", "torchscript"])
def exporter(request):
    """The export tests run with both exporters: dynamo (the default) and the deprecated TorchScript one."""
    return request.param


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ort_run(path, x: torch.Tensor, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> torch.Tensor:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def export_fixture(name, tmp_path, *extra, exporter="dynamo"):
    out = tmp_path / f"{name}.onnx"
    extra = (*extra, "--exporter", exporter)
    shape = ",".join(str(d) for d in CATALOG[name]["input"])
    result = run(
        "export", ckpt(name), "--arch", arch_spec(name), "--onnx", out, "--input-shape", shape, "--json", *extra
    )
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def assert_deployable(path):
    model = onnx.load(str(path))
    assert audit_graph(model) == []
    onnx.checker.check_model(str(path), full_check=True)
    assert count_ops(model, "ReduceMean") == 0 or not any(
        n.op_type == "ReduceMean" and all(i in {t.name for t in model.graph.initializer} for i in n.input)
        for n in model.graph.node
    )
    weights = [
        np.asarray(onnx.numpy_helper.to_array(t)).tobytes() for t in model.graph.initializer if len(t.raw_data) >= 1024
    ]
    assert len({hashlib.sha256(w).digest() for w in weights}) == len(weights), "a weight is stored twice"
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            assert node.input[1] in {t.name for t in model.graph.initializer}
    # No build-machine paths: the dynamo exporter's per-node stack traces are not shipped.
    assert not any(n.metadata_props for n in model.graph.node)
    assert not any(str(path.parent) in p.value or "site-packages" in p.value for p in model.metadata_props)
    # No node computes on constants alone (the TorchScript exporter's static-pad subgraphs are folded too).
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        assert node.op_type == "Constant" or not all(i in constants for i in node.input if i), node


@pytest.mark.parametrize("name", BAKEABLE)
def test_export_every_fixture_runs_and_matches_baked_model(name, tmp_path, exporter):
    out, payload = export_fixture(name, tmp_path, exporter=exporter)
    assert set(payload) >= {"output", "nodes", "initializers", "external_data", "baked", "opset"}
    assert payload["baked"] == len(CATALOG[name]["layers"]) and payload["external_data"] is False
    assert_deployable(out)
    baked, _ = bake_model(load_fixture(name))
    dtype = CATALOG[name].get("dtype", torch.float32)
    for batch in (1, 3):
        x = fixture_input(name, batch=batch, seed=batch)
        if dtype == torch.bfloat16:  # exported as float32: compare with the same weights widened
            x, reference = x.float(), baked.float()
        else:
            reference = baked
        with torch.no_grad():
            expected = reference(x)
        assert rel_err(ort_run(out, x), expected) < OUT_TOL[torch.float16 if dtype == torch.float16 else torch.float32]


def test_export_of_unsupported_layers_is_refused_with_reason(tmp_path):
    out = tmp_path / "u.onnx"
    result = run(
        "export", ckpt("unsupported"), "--arch", arch_spec("unsupported"), "--onnx", out, "--input-shape", "1,3,10,10"
    )
    assert result.exit_code == 2
    assert "not constant where it must be" in result.stderr and "wsfold inspect" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_input_shape_comes_from_the_model_or_is_asked_for(tmp_path):
    result = run("export", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "--onnx", tmp_path / "b.onnx", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["inputs"][0]["shape"] == [1, 3, 32, 32]
    missing = run("export", ckpt("variants"), "--arch", arch_spec("variants"), "--onnx", tmp_path / "v.onnx")
    assert missing.exit_code == 2 and "--input-shape" in missing.stderr
    bad = run(
        "export",
        ckpt("variants"),
        "--arch",
        arch_spec("variants"),
        "--onnx",
        tmp_path / "v.onnx",
        "--input-shape",
        "1,x",
    )
    assert bad.exit_code == 2 and "positive integers" in bad.stderr
    wrong = run(
        "export",
        ckpt("variants"),
        "--arch",
        arch_spec("variants"),
        "--onnx",
        tmp_path / "v.onnx",
        "--input-shape",
        "1,5,8,8",
    )
    assert wrong.exit_code == 2 and "cannot run on inputs" in wrong.stderr
    assert not (tmp_path / "v.onnx").exists()


def test_metadata_records_version_source_hash_and_baked_count(tmp_path):
    out, _ = export_fixture("variants", tmp_path)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["wsfold_source_sha256"] == hashlib.sha256(ckpt("variants").read_bytes()).hexdigest()
    assert props["wsfold_baked_layers"] == "9" and props["wsfold_version"]


def test_same_padding_stride_2_dynamic_hw_is_correct_at_odd_and_even_sizes(tmp_path, exporter):
    out, payload = export_fixture("bit_tiny", tmp_path, "--dynamic-hw", exporter=exporter)
    assert payload["dynamic_hw"] is True
    original = load_fixture("bit_tiny")
    for shape in ((1, 3, 32, 32), (2, 3, 31, 33), (1, 3, 45, 40)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(ort_run(out, x), original(x)) < 1e-5, shape


def test_static_batch(tmp_path, exporter):
    out, _ = export_fixture("variants", tmp_path, "--static-batch", exporter=exporter)
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 12, 12]


def test_external_data_loads_and_matches(tmp_path, exporter):
    out, payload = export_fixture("bit_tiny", tmp_path, "--external-data", exporter=exporter)
    assert payload["external_data"] is True
    assert (tmp_path / "bit_tiny.onnx.data").stat().st_size > 30_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bit_tiny.onnx", "bit_tiny.onnx.data"]
    assert_deployable(out)
    x = fixture_input("bit_tiny", batch=3)
    with torch.no_grad():
        assert rel_err(ort_run(out, x), load_fixture("bit_tiny")(x)) < 1e-5
    # The one-file graph (its weights streamed into the protobuf from the exporter's data file) holds exactly
    # the same graph and the same bytes.
    single = tmp_path / "single"
    single.mkdir()
    one, _ = export_fixture("bit_tiny", single, exporter=exporter)
    assert sorted(p.name for p in single.iterdir()) == ["bit_tiny.onnx"]
    a, b = onnx.load(str(out)), onnx.load(str(one))
    assert [(t.name, t.data_type, list(t.dims), t.raw_data) for t in a.graph.initializer] == [
        (t.name, t.data_type, list(t.dims), t.raw_data) for t in b.graph.initializer
    ]
    assert a.graph.node == b.graph.node and a.graph.input == b.graph.input and a.metadata_props == b.metadata_props
    assert a.opset_import == b.opset_import and a.ir_version == b.ir_version


def test_pad_maxpool_guard_is_what_keeps_onnxruntime_correct(tmp_path, exporter):
    """Without the -0.0 pad value, onnxruntime up to 1.31 fuses Pad(0)+MaxPool under its default optimizations
    and changes the result (1.32 no longer does). The guarded graph is right either way; where the runtime
    miscompiles the unguarded one, it does so only with its optimizations on."""
    out, payload = export_fixture("bit_tiny", tmp_path, exporter=exporter)
    assert len(payload["pad_maxpool_guarded"]) == 1
    x = fixture_input("bit_tiny", batch=3)
    with torch.no_grad():
        expected = load_fixture("bit_tiny")(x)
    assert rel_err(ort_run(out, x), expected) < 1e-5
    model = onnx.load(str(out))
    for init in model.graph.initializer:
        if init.name.endswith("_neg_zero"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(0.0, dtype=np.float32), init.name))
    unguarded = tmp_path / "unguarded.onnx"
    onnx.save(model, str(unguarded))
    assert rel_err(ort_run(unguarded, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), expected) < 1e-5
    miscompiled = rel_err(ort_run(unguarded, x), expected) > 1e-4
    assert miscompiled or tuple(int(v) for v in ort.__version__.split(".")[:2]) >= (1, 32), ort.__version__


def test_existing_onnx_refused_and_failed_export_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    result = run("export", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "--onnx", out)
    assert result.exit_code == 2 and "--force" in result.stderr and out.read_bytes() == b"old"

    def broken(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    result = run(
        "export", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "--onnx", tmp_path / "n.onnx", "--external-data"
    )
    assert result.exit_code == 2 and "onnx.checker rejects" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_of_an_already_baked_checkpoint(tmp_path, exporter):
    baked = tmp_path / "b.safetensors"
    assert run("bake", ckpt("bit_tiny"), "--arch", arch_spec("bit_tiny"), "-o", baked, "-q").exit_code == 0
    out = tmp_path / "b.onnx"
    result = run("export", baked, "--arch", arch_spec("bit_tiny"), "--onnx", out, "--json", "--exporter", exporter)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["baked"] == 4
    x = fixture_input("bit_tiny")
    with torch.no_grad():
        assert rel_err(ort_run(out, x), load_fixture("bit_tiny")(x)) < 1e-5
