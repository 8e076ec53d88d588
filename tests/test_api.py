"""The Python API, called directly (no CLI): prepare, and every stage on its own, never changing what it is handed."""

from __future__ import annotations

import pytest
import torch
from conftest import OUT_TOL, arch_spec, ckpt, fixture_input, load_fixture, rel_err

import wsfold
from wsfold.bake.detect import detect_layers


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a core function must leave as it was: module types and modes, each tensor's dtype, storage,
    grad flag, shape and content."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "tensors": [
            (n, t.dtype, t.data_ptr(), t.requires_grad, tuple(t.shape), float(t.detach().double().sum()))
            for n, t in tensors
        ],
    }


def test_prepare_bakes_and_folds_a_checkpoint_into_a_model_without_ws_that_matches_the_original():
    prepared = wsfold.prepare(ckpt("ws_bn"), arch=arch_spec("ws_bn"))
    assert [layer.name for layer in prepared.detection.layers] == ["0", "4"]
    assert [(f.norm, f.into, f.kind) for f in prepared.fold.folded] == [
        ("1", "0", "batchnorm"),
        ("5", "4", "batchnorm"),
    ]
    assert detect_layers(prepared.model).layers == []  # nothing weight-standardized is left
    assert isinstance(prepared.model[1], torch.nn.Identity)
    x = fixture_input("ws_bn")
    with torch.no_grad():
        assert rel_err(prepared.model(x), prepared.original(x)) < OUT_TOL[torch.float32]
    assert prepared.source == ckpt("ws_bn") and prepared.baked_layers == 2


def test_prepare_without_keeping_the_original_and_without_folding():
    prepared = wsfold.prepare(ckpt("ws_bn"), arch=arch_spec("ws_bn"), fold=False, keep_original=False)
    assert prepared.original is None and prepared.fold.folded == [] and not prepared.folded
    assert isinstance(prepared.model[1], torch.nn.BatchNorm2d)
    assert detect_layers(prepared.model).layers == []


def test_prepare_of_a_model_in_hand_leaves_it_unchanged_even_in_training_mode():
    model = load_fixture("ws_bn").train()
    before = snapshot(model)
    prepared = wsfold.prepare(model)
    assert snapshot(model) == before
    assert prepared.original is model
    assert prepared.model.training  # each module keeps the mode it had
    assert prepared.fold.folded == []  # BN in training mode does not fold
    assert "training mode" in prepared.fold.not_folded[0].reason


def test_every_stage_leaves_its_input_and_the_model_sharing_modules_with_it_unchanged(tmp_path):
    original = load_fixture("ws_bn")
    original[3].train()  # a mixed-mode model: flags must come back per module
    source_before = snapshot(original)
    baked, report = wsfold.bake_model(original)
    assert snapshot(original) == source_before
    baked_before = snapshot(baked)
    folded, fold_report = wsfold.fold_model(baked)
    assert snapshot(baked) == baked_before and snapshot(original) == source_before
    folded_before = snapshot(folded)

    onnx_path = tmp_path / "m.onnx"
    wsfold.export_onnx(folded, onnx_path, input_shapes=[(1, 3, 10, 10)], bake_report=report, fold_report=fold_report)
    result = wsfold.verify_onnx(original, onnx_path, per_layer=True)
    wsfold.save_baked(folded, tmp_path / "m.safetensors", bake_report=report, fold_report=fold_report)
    wsfold.save_baked(folded, tmp_path / "m.pt", bake_report=report)
    assert snapshot(folded) == folded_before
    assert snapshot(baked) == baked_before
    assert snapshot(original) == source_before
    assert result.layers  # (its verdict is for test_verify; here only that it ran on the untouched models)


def test_export_of_a_bfloat16_baked_model_leaves_it_and_its_source_in_bfloat16(tmp_path):
    original = load_fixture("bf16")
    baked, report = wsfold.bake_model(original)
    # bake_model shares the untouched submodules with its input
    shared = [n for n, m in baked.named_modules() if n and m is original.get_submodule(n)]
    assert shared
    before_original, before_baked = snapshot(original), snapshot(baked)
    result = wsfold.export_onnx(baked, tmp_path / "bf16.onnx", input_shapes=[(1, 3, 10, 10)], bake_report=report)
    assert any("bfloat16 model exported as float32" in n for n in result.notes)
    assert snapshot(baked) == before_baked and snapshot(original) == before_original
    assert all(p.dtype == torch.bfloat16 for p in original.parameters())
    verdict = wsfold.verify_onnx(original, tmp_path / "bf16.onnx")
    assert verdict, str(verdict)
    assert snapshot(original) == before_original


def test_verify_per_layer_from_python_on_a_folded_batchnorm_model_passes(tmp_path):
    prepared = wsfold.prepare(ckpt("ws_bn"), arch=arch_spec("ws_bn"))
    path = tmp_path / "ws_bn.onnx"
    wsfold.export_onnx(prepared, path, input_shapes=[(1, 3, 10, 10)])
    result = wsfold.verify_onnx(prepared, path, per_layer=True)
    assert result, str(result)
    assert len(result.layers) == 4 and all(layer.passed for layer in result.layers)  # 2 convs: weight, bias
    # The original model alone, with the graph's metadata saying it was folded
    alone = wsfold.verify_onnx(prepared.original, path, per_layer=True)
    assert alone and all(layer.passed for layer in alone.layers)


def test_verify_per_layer_without_wsfold_metadata_compares_with_the_closer_folding(tmp_path):
    """export_onnx handed a bare model stamps no fold state; verify then judges both foldings."""
    original = load_fixture("ws_bn")
    for fold in (True, False):
        baked, _ = wsfold.bake_model(original)
        model = wsfold.fold_model(baked)[0] if fold else baked
        path = tmp_path / f"bare{fold}.onnx"
        wsfold.export_onnx(model, path, input_shapes=[(1, 3, 10, 10)])
        result = wsfold.verify_onnx(original, path, per_layer=True)
        assert result and len(result.layers) >= 2 and all(layer.passed for layer in result.layers), str(result)


def test_verify_per_layer_names_a_wrong_weight_of_a_folded_model(tmp_path):
    import onnx
    from onnx import numpy_helper

    prepared = wsfold.prepare(ckpt("ws_bn"), arch=arch_spec("ws_bn"))
    path = tmp_path / "ws_bn.onnx"
    wsfold.export_onnx(prepared, path, input_shapes=[(1, 3, 10, 10)])
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.name == "4.weight")
    array = numpy_helper.to_array(init).copy()
    array[0] *= 1.01
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(proto, str(path))
    result = wsfold.verify_onnx(prepared, path, per_layer=True)
    assert not result
    assert [layer.name for layer in result.layers if not layer.passed] == ["4"]


def test_a_ws_module_used_at_two_places_is_baked_at_both(tmp_path):
    from models import StdConv2d

    conv = StdConv2d(4, 4, 3, padding=1)
    tied = torch.nn.Sequential(conv, torch.nn.ReLU(), conv).eval()
    before = snapshot(tied)
    prepared = wsfold.prepare(tied)
    assert snapshot(tied) == before
    assert type(prepared.model[0]) is torch.nn.Conv2d and prepared.model[2] is prepared.model[0]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(prepared.model(x), tied(x)) < OUT_TOL[torch.float32]
    wsfold.export_onnx(prepared, tmp_path / "tied.onnx", input_shapes=[(2, 4, 8, 8)])
    assert wsfold.verify_onnx(prepared, tmp_path / "tied.onnx")


@pytest.mark.parametrize(
    "call",
    [
        lambda: wsfold.prepare(None),
        lambda: wsfold.prepare(123),
        lambda: wsfold.prepare(ckpt("ws_bn"), arch=lambda: None),
        lambda: wsfold.detect_layers("model.pt"),
        lambda: wsfold.bake_model("model.pt"),
        lambda: wsfold.fold_model("model.pt"),
        lambda: wsfold.export_onnx("model.pt", "m.onnx", input_shapes=[(1, 3, 8, 8)]),
        lambda: wsfold.verify_onnx(None, "m.onnx"),
        lambda: wsfold.save_baked("model.pt", "m.safetensors"),
        lambda: wsfold.load_model(None),
    ],
)
def test_the_api_names_a_wrong_argument_type(call):
    with pytest.raises(TypeError, match="expects|arch is|must be"):
        call()


@pytest.mark.parametrize("how", ["no_fold", "train_mode"])
def test_per_layer_recognizes_a_batchnorm_the_exporter_fused_itself(tmp_path, how):
    """wsfold did not fold the BatchNorms (fold=False, or the model in training mode), torch.onnx did."""
    if how == "no_fold":
        prepared = wsfold.prepare(ckpt("ws_bn"), arch=arch_spec("ws_bn"), fold=False)
    else:
        prepared = wsfold.prepare(load_fixture("ws_bn").train())
    assert prepared.fold.folded == []
    path = tmp_path / "m.onnx"
    wsfold.export_onnx(prepared, path, input_shapes=[(2, 3, 10, 10)])
    result = wsfold.verify_onnx(prepared, path)
    assert result, str(result)
    assert {layer.note for layer in result.layers if layer.tensor.startswith("0.")} == {
        "matches with BatchNorm 1 fused into it by the exporter"
    }
    # ...but not any per-channel scale: one filter off by 1% still fails
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w[2] *= 1.01
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(path))
    assert not wsfold.verify_onnx(prepared, path)
