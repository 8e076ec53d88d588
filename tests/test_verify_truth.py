"""verify tells the truth: graphs that wsfold export writes pass, with both exporters; a 1% change to one filter
fails and names its layer; another model's graph gets one verdict; diffusion U-Nets with an integer timestep
verify; paths, pipes, forged manifests, float64 checkpoints and fixed-size models are handled up front."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnx
import pytest
import torch
from conftest import CATALOG, FIXTURES, arch_spec, ckpt
from onnx import numpy_helper
from typer.testing import CliRunner

from wsfold.cli.app import app
from wsfold.errors import brief

MODELS = FIXTURES / "models.py"
BAKEABLE = sorted(n for n in CATALOG if not CATALOG[n].get("unsupported"))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def save(tmp_path, arch: str, seed: int = 0, name: str | None = None):
    import models

    path = tmp_path / f"{name or arch}.pt"
    torch.save(getattr(models, arch)(seed).state_dict(), path)
    return path


def export_and_verify(src, arch, onnx_path, shapes, *extra_export, dtypes=(), exporter="dynamo"):
    spec = f"{MODELS}:{arch}"
    shape_args = [a for s in shapes for a in ("--input-shape", s)]
    dtype_args = [a for d in dtypes for a in ("--input-dtype", d)]
    exported = run(
        "export", src, "--arch", spec, "--onnx", onnx_path, *shape_args, *dtype_args, "--exporter", exporter,
        "-q", *extra_export,
    )  # fmt: skip
    assert exported.exit_code == 0, exported.stderr
    return run("verify", src, "--arch", spec, "--onnx", onnx_path, *shape_args, "--json")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize(
    "arch, shape", [("hybrid_vit", "1,3,16,16"), ("same_bias_shapes", "1,3,8,8")], ids=["vit", "same-biases"]
)
def test_linear_layers_on_tokens_and_repeated_bias_shapes_pair_by_the_graph(tmp_path, arch, shape, exporter):
    """MatMul weights stored transposed under new names, zero biases dropped, six biases of one shape: each layer
    is found in the graph and matches (the old name-or-shape pairing failed both)."""
    src = save(tmp_path, arch)
    result = export_and_verify(src, arch, tmp_path / "m.onnx", [shape], exporter=exporter)
    assert result.exit_code == 0, result.stdout
    payload = json.loads(result.stdout)
    assert payload["passed"] and payload["layers_unpaired"] == [] and not payload["foreign_graph"]
    assert payload["layers"] and all(layer["passed"] for layer in payload["layers"])
    names = {layer["name"] for layer in payload["layers"]}
    if arch == "hybrid_vit":
        assert {"blocks.1.fc2", "blocks.0.qkv", "head", "stem"} <= names
        assert payload["layers_compared"] == 10
    else:
        assert payload["layers_compared"] == 6


def _scale_matmul_filter(path, out, layer_index: int):
    """A 1% change to one output channel of the layer_index-th MatMul weight (stored (in, out) in the graph)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    node = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits][layer_index]
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    transposed = node.op_type == "MatMul" or not any(a.name == "transB" and a.i for a in node.attribute)
    if transposed:
        w[:, 3] *= 1.01
    else:
        w[3] *= 1.01
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    onnx.save(model, str(out))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_1pct_change_to_one_linear_filter_fails_and_names_its_layer(tmp_path, exporter):
    src = save(tmp_path, "hybrid_vit")
    good = tmp_path / "good.onnx"
    assert export_and_verify(src, "hybrid_vit", good, ["1,3,16,16"], exporter=exporter).exit_code == 0
    bad = tmp_path / "bad.onnx"
    _scale_matmul_filter(good, bad, 2)  # the first block's third linear layer in the graph's order
    result = run("verify", src, "--arch", f"{MODELS}:hybrid_vit", "--onnx", bad, "--input-shape", "1,3,16,16", "--json")
    assert result.exit_code == 1, result.stdout
    payload = json.loads(result.stdout)
    failing = [layer for layer in payload["layers"] if not layer["passed"]]
    assert len(failing) == 1 and failing[0]["tensor"].endswith(".weight")
    assert failing[0]["name"].startswith("blocks.0.")
    assert 0.009 < failing[0]["max_rel_error"] < 0.011
    assert payload["layers_unpaired"] == [] and not payload["foreign_graph"]


def test_another_models_graph_gets_one_verdict(tmp_path):
    src = save(tmp_path, "hybrid_vit")
    graph = tmp_path / "vit.onnx"
    assert export_and_verify(src, "hybrid_vit", graph, ["1,3,16,16"]).exit_code == 0
    other = save(tmp_path, "hybrid_vit", seed=7, name="other")
    spec = f"{MODELS}:hybrid_vit"
    result = run("verify", other, "--arch", spec, "--onnx", graph, "--input-shape", "1,3,16,16", "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["foreign_graph"] is True and payload["layers"] == []
    assert payload["cause"].startswith("--onnx is not a graph of this SOURCE's model")
    human = run("verify", other, "--arch", spec, "--onnx", graph, "--input-shape", "1,3,16,16")
    assert "not a graph of this SOURCE's model" in human.stdout and "differs from" not in human.stdout


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_every_fixture_graph_pairs_every_layer_with_both_exporters(tmp_path, exporter):
    for name in BAKEABLE:
        out = tmp_path / f"{name}.onnx"
        shape = ",".join(map(str, CATALOG[name]["input"]))
        spec = arch_spec(name)
        exported = run(
            "export", ckpt(name), "--arch", spec, "--onnx", out, "--input-shape", shape, "--exporter", exporter, "-q"
        )
        assert exported.exit_code == 0, (name, exported.stderr)
        result = run("verify", ckpt(name), "--arch", spec, "--onnx", out, "--input-shape", shape, "--json")
        assert result.exit_code == 0, (name, result.stdout)
        payload = json.loads(result.stdout)
        assert payload["layers_unpaired"] == [], (name, payload["layers_unpaired"])
        assert payload["layers"] and all(layer["passed"] for layer in payload["layers"]), name


@pytest.mark.parametrize("arch, shape", [("diffusion_unet", "1,3,16,16"), ("diffusion_unet1d", "1,3,32")])
def test_diffusion_unets_with_an_int64_timestep_verify(tmp_path, arch, shape):
    """The sinusoidal embedding is built at torch's default dtype from an int64 timestep: the float64 reference
    builds it in float64 too (it failed with 'mat1 and mat2 must have the same dtype')."""
    src = save(tmp_path, arch)
    result = export_and_verify(src, arch, tmp_path / "u.onnx", [shape, "1"], dtypes=("float32", "int64"))
    assert result.exit_code == 0, result.stdout + result.stderr
    payload = json.loads(result.stdout)
    assert payload["passed"] and payload["layers_unpaired"] == []
    out = payload["outputs"][0]
    assert out["onnx_vs_float64"] <= out["allowed"] < 1e-4  # the float64 reference computes the same function


def test_a_dynamic_hw_graph_verifies_without_the_shape_again(tmp_path):
    src = save(tmp_path, "diffusion_unet")
    graph = tmp_path / "u.onnx"
    spec = f"{MODELS}:diffusion_unet"
    exported = run(
        "export", src, "--arch", spec, "--onnx", graph, "--input-shape", "1,3,16,16", "--input-shape", "1",
        "--input-dtype", "float32", "--input-dtype", "int64", "--dynamic-hw", "-q",
    )  # fmt: skip
    assert exported.exit_code == 0, exported.stderr
    result = run("verify", src, "--arch", spec, "--onnx", graph, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    shapes = json.loads(result.stdout)["batch_input_shapes"]
    assert [[1, 3, 16, 16], [1]] in shapes and any(s[0][2] > 16 for s in shapes)


def test_a_path_with_non_ascii_characters(tmp_path):
    folder = tmp_path / "modèles" / "ünï"
    folder.mkdir(parents=True)
    graph = folder / "ö.onnx"
    name = "bit_tiny"
    shape = ",".join(map(str, CATALOG[name]["input"]))
    exported = run("export", ckpt(name), "--arch", arch_spec(name), "--onnx", graph, "--input-shape", shape, "-q")
    assert exported.exit_code == 0, exported.stderr
    result = run("verify", ckpt(name), "--arch", arch_spec(name), "--onnx", graph, "--input-shape", shape)
    assert result.exit_code == 0, result.stdout + result.stderr


def test_inputs_that_is_a_pipe_is_refused_at_once(tmp_path):
    fifo = tmp_path / "inputs.npz"
    os.mkfifo(fifo)
    name = "bit_tiny"
    start = time.monotonic()
    result = run("verify", ckpt(name), "--arch", arch_spec(name), "--onnx", ckpt(name), "--inputs", fifo)
    assert time.monotonic() - start < 60
    assert result.exit_code == 2
    graph = tmp_path / "g.onnx"
    run("export", ckpt(name), "--arch", arch_spec(name), "--onnx", graph, "-q")
    result = run("verify", ckpt(name), "--arch", arch_spec(name), "--onnx", graph, "--inputs", fifo)
    assert result.exit_code == 2 and "not a regular file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_manifest_emptied_of_its_layers_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    name = "bit_tiny"
    baked = tmp_path / "b.safetensors"
    assert run("bake", ckpt(name), "--arch", arch_spec(name), "-o", baked, "-q").exit_code == 0
    with safe_open(str(baked), "pt") as f:
        manifest = json.loads(f.metadata()["wsfold"])
    manifest["layers"], manifest["folded"] = [], []
    forged = tmp_path / "forged.safetensors"
    save_file(load_file(str(ckpt(name))), str(forged), metadata={"wsfold": json.dumps(manifest)})
    out = tmp_path / "f.onnx"
    result = run("export", forged, "--arch", arch_spec(name), "--onnx", out)
    assert result.exit_code == 2 and "manifest lists 0 as baked" in result.stderr
    assert not out.exists()
    graph = tmp_path / "g.onnx"
    assert run("export", ckpt(name), "--arch", arch_spec(name), "--onnx", graph, "-q").exit_code == 0
    assert run("verify", forged, "--arch", arch_spec(name), "--onnx", graph).exit_code == 2


def test_a_float64_checkpoint_is_told_which_dtype_to_export(tmp_path):
    import models

    src = tmp_path / "m64.pt"
    torch.save(models.bit_tiny().double().state_dict(), src)
    spec = f"{MODELS}:bit_tiny"
    out = tmp_path / "m.onnx"
    refused = run("export", src, "--arch", spec, "--onnx", out)
    assert refused.exit_code == 2 and "--dtype float32" in refused.stderr and not out.exists()
    assert run("export", src, "--arch", spec, "--onnx", out, "--dtype", "float32", "-q").exit_code == 0
    verified = run("verify", src, "--arch", spec, "--onnx", out, "--json")
    assert verified.exit_code == 0, verified.stdout
    # Asked for explicitly, a float64 graph is written; onnxruntime's refusal then says which --dtype to use.
    assert run("export", src, "--arch", spec, "--onnx", out, "--dtype", "float64", "--force", "-q").exit_code == 0
    verified = run("verify", src, "--arch", spec, "--onnx", out)
    assert verified.exit_code == 2 and "--dtype float32" in verified.stderr


class FixedSize(torch.nn.Module):
    """Refuses any other image size, as ViT patch embeddings do ("Input image size doesn't match model")."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.pos = torch.nn.Parameter(torch.zeros(1, 16, 8))

    def forward(self, x):
        if x.shape[-2:] != (16, 16):
            raise ValueError(f"Input image size ({x.shape[-2]}*{x.shape[-1]}) doesn't match model (16*16).")
        return self.conv(x).flatten(2).transpose(1, 2) + self.pos


def test_dynamic_hw_on_a_model_that_fixes_its_size_is_refused_before_exporting(tmp_path):
    from wsfold import export_onnx
    from wsfold.errors import OptionError

    out = tmp_path / "m.onnx"
    with pytest.raises(OptionError, match="fixed spatial sizes .it runs at 16x16 only"):
        export_onnx(FixedSize().eval(), out, input_shapes=[(1, 3, 16, 16)], dynamic_hw=True)
    assert not out.exists()


def test_a_container_holding_position_embeddings_is_not_warned_about():
    from wsfold import detect_layers

    detection = detect_layers(FixedSize())
    assert detection.unprobed == [] and detection.unsupported == []


class DepthHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x).squeeze(1)  # (N, H, W): dim 1 is height, not channels


def test_a_depth_map_is_judged_whole_and_a_conv_output_per_channel(tmp_path):
    from wsfold import verify_onnx
    from wsfold.onnx.export import export_onnx

    model = DepthHead().eval()
    path = tmp_path / "d.onnx"
    export_onnx(model, path, input_shapes=[(1, 3, 32, 32)])
    result = verify_onnx(model, path)
    assert result.passed and result.outputs[0].judged_per == "tensor"
    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path / "c.onnx"
    export_onnx(conv, path, input_shapes=[(1, 3, 64)])
    result = verify_onnx(conv, path)
    assert result.passed and result.outputs[0].judged_per == "channel"


def test_brief_cuts_at_a_word_boundary():
    text = "Proxy object cannot be iterated. " * 10
    cut = brief(text, 60)
    assert cut.endswith(" ...") and len(cut) <= 64 and cut[:-4] == text[: len(cut) - 4]
    assert not cut[:-4].endswith(("Pro", "obj"))
    assert brief("short") == "short"


def test_per_layer_pairing_ignores_names(tmp_path):
    """Renaming every initializer of a correct graph changes nothing: pairs come from the edges."""
    name = "variants"
    shape = ",".join(map(str, CATALOG[name]["input"]))
    graph = tmp_path / "g.onnx"
    assert (
        run("export", ckpt(name), "--arch", arch_spec(name), "--onnx", graph, "--input-shape", shape, "-q").exit_code
        == 0
    )
    model = onnx.load(str(graph))
    renames = {init.name: f"w{i}" for i, init in enumerate(model.graph.initializer)}
    for init in model.graph.initializer:
        init.name = renames[init.name]
    for node in model.graph.node:
        for i, value in enumerate(node.input):
            if value in renames:
                node.input[i] = renames[value]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, str(renamed))
    result = run("verify", ckpt(name), "--arch", arch_spec(name), "--onnx", renamed, "--input-shape", shape, "--json")
    payload = json.loads(result.stdout)
    assert result.exit_code == 0 and payload["layers_unpaired"] == []
    assert payload["layers"] and all(layer["passed"] for layer in payload["layers"])
    assert np.isfinite([layer["max_abs_error"] for layer in payload["layers"]]).all()


@pytest.mark.parametrize("damage", ["scale_1.2", "other_checkpoint"])
def test_a_layer_changed_beyond_recognition_fails_by_elimination(tmp_path, damage):
    """A layer whose weights agree with no op's (every filter x1.2, or another checkpoint's weights) pairs with
    the one op of its shape that no other layer takes, and fails there: it was listed as 'not in the graph' and
    the graph passed when the outputs could not show it."""
    import models

    src = save(tmp_path, "same_bias_shapes")
    good = tmp_path / "good.onnx"
    assert export_and_verify(src, "same_bias_shapes", good, ["1,3,8,8"]).exit_code == 0
    model = onnx.load(str(good))
    inits = {i.name: i for i in model.graph.initializer}
    conv = [n for n in model.graph.node if n.op_type == "Conv"][3]
    if damage == "scale_1.2":
        w = numpy_helper.to_array(inits[conv.input[1]]) * np.float32(1.2)
    else:
        w = models.same_bias_shapes(seed=5)[3].weight.detach().numpy()
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), conv.input[1]))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    spec = f"{MODELS}:same_bias_shapes"
    result = run("verify", src, "--arch", spec, "--onnx", bad, "--input-shape", "1,3,8,8", "--json")
    assert result.exit_code == 1, result.stdout
    payload = json.loads(result.stdout)
    failing = [layer for layer in payload["layers"] if not layer["passed"]]
    assert [layer["name"] for layer in failing] == ["3"] and "elimination" in failing[0]["note"]
    assert payload["layers_unpaired"] == [] and not payload["foreign_graph"]
