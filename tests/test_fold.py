from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import CATALOG, arch_spec, ckpt, fixture_input, load_fixture, rel_err
from typer.testing import CliRunner

from wsfold.bake.baker import bake_model
from wsfold.bake.fold import fold_model
from wsfold.cli.app import app

FOLD_FIXTURES = sorted(n for n in CATALOG if "folded" in CATALOG[n])


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", FOLD_FIXTURES)
def test_fold_matches_unfolded_baked_model_and_reports_each_decision(name):
    baked, _ = bake_model(load_fixture(name))
    before = {k: v.clone() for k, v in baked.state_dict().items()}
    folded, report = fold_model(baked)
    assert [(f.norm, f.into, f.kind) for f in report.folded] == CATALOG[name]["folded"]
    refused = {entry.name for entry in report.not_folded}
    assert refused == CATALOG[name]["not_folded"] | {n for n, _, k in CATALOG[name]["folded"] if k.endswith("affine")}
    assert all(entry.reason for entry in report.not_folded)
    if CATALOG[name].get("fold_skipped"):
        assert CATALOG[name]["fold_skipped"] in report.skipped
    for seed in range(3):
        x = fixture_input(name, seed=seed)
        with torch.no_grad():
            assert rel_err(folded(x), baked(x)) < 1e-5
    after = baked.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "input mutated"


def test_refusals_say_why():
    reasons = {}
    for name in ("ws_bn", "gn_convs", "bn_skip"):
        _, report = fold_model(bake_model(load_fixture(name))[0])
        reasons.update({(name, e.name): e.reason for e in report.not_folded})
    assert "not the output of a conv" in reasons[("ws_bn", "3")]
    assert "a ReLU stands between it and the next conv" in reasons[("gn_convs", "3")]
    assert "zero-pads and beta is not zero" in reasons[("gn_convs", "6")]
    assert "statistics depend on the input" in reasons[("gn_convs", "1")]
    assert "output of conv also feeds add" in reasons[("bn_skip", "bn")]


def test_bn_in_training_mode_or_without_running_stats_is_not_folded():
    conv = torch.nn.Conv2d(3, 4, 3)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4, track_running_stats=False)).eval()
    _, report = fold_model(model)
    assert report.folded == [] and "track_running_stats=False" in report.not_folded[0].reason
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].train()
    _, report = fold_model(model)
    assert report.folded == [] and "training mode" in report.not_folded[0].reason


def test_untraceable_model_is_still_baked_and_says_folding_was_skipped(tmp_path):
    result = run("bake", ckpt("untraceable"), "--arch", arch_spec("untraceable"), "-o", tmp_path / "u.pt", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [layer["name"] for layer in payload["layers"]] == ["conv"]
    assert payload["folded"] == [] and "cannot be traced by torch.fx" in payload["fold_skipped"]


@pytest.mark.parametrize("name", ["ws_bn", "ws_frozen_bn", "bcn", "gn_convs"])
def test_exported_graph_has_no_batchnorm_for_folded_norms(name, tmp_path):
    out = tmp_path / f"{name}.onnx"
    shape = ",".join(map(str, CATALOG[name]["input"]))
    result = run("export", ckpt(name), "--arch", arch_spec(name), "--onnx", out, "--input-shape", shape, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["folded"]) == len(CATALOG[name]["folded"])
    graph = onnx.load(str(out)).graph
    unfolded_bn = sum(
        isinstance(m, torch.nn.BatchNorm2d)
        for n, m in load_fixture(name).named_modules()
        if n in CATALOG[name]["not_folded"]
    )
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == unfolded_bn
    verify = run("verify", ckpt(name), "--arch", arch_spec(name), "--onnx", out, "--input-shape", shape, "--per-layer")
    assert verify.exit_code == 0, verify.stdout


def test_no_fold_flag_and_inspect_preview(tmp_path):
    result = run("bake", ckpt("ws_bn"), "--arch", arch_spec("ws_bn"), "-o", tmp_path / "b.pt", "--no-fold", "--json")
    assert json.loads(result.stdout)["folded"] == []
    preview = run("inspect", ckpt("ws_bn"), "--arch", arch_spec("ws_bn"), "--json")
    assert [f["norm"] for f in json.loads(preview.stdout)["folded"]] == ["1", "5"]
    human = run("inspect", ckpt("ws_bn"), "--arch", arch_spec("ws_bn"))
    assert "would fold 1 into 0, 5 into 4 (batchnorm)" in human.stdout


def test_folded_safetensors_loads_back_with_the_architecture(tmp_path):
    from wsfold.load.checkpoint import load_model

    out = tmp_path / "bcn.safetensors"
    assert run("bake", ckpt("bcn"), "--arch", arch_spec("bcn"), "-o", out, "-q").exit_code == 0
    reloaded = load_model(out, arch=arch_spec("bcn")).model
    x = fixture_input("bcn")
    with torch.no_grad():
        assert rel_err(reloaded(x), load_fixture("bcn")(x)) < 1e-5


def test_torch_fuse_conv_bn_on_a_ws_conv_is_the_trap_wsfold_avoids():
    """torch's fuse_conv_bn_eval folds into the raw weight, which the WS layer then re-standardizes."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = load_fixture("ws_bn")
    x = fixture_input("ws_bn")
    with torch.no_grad():
        expected = model[1](model[0](x))
        naive = fuse_conv_bn_eval(copy.deepcopy(model[0]), model[1])(x)
        folded, _ = fold_model(bake_model(model)[0])
        ours = folded[1](folded[0](x))
    assert rel_err(naive, expected) > 1e-2
    assert rel_err(ours, expected) < 1e-5


def test_the_terminal_says_alike_normalizers_in_one_line_and_json_lists_each():
    """A deep network has a hundred normalizers not folded for the same reason: one line says so, with the first
    names and the count; a reason met once, or a kind of fold, keeps its own line."""
    import io

    from rich.console import Console

    from wsfold.bake.fold import Folded, FoldReport, NotFolded
    from wsfold.cli import render

    same = "its statistics depend on the input at inference; relu stands between it and the next conv/linear"
    report = FoldReport(
        folded=[Folded(f"b{i}.bn", f"b{i}.conv", "batchnorm") for i in range(5)]
        + [Folded("n", "c", "per-channel affine")],
        not_folded=[NotFolded(f"s{i}.norm", same) for i in range(49)]
        + [NotFolded("bn", "the output of conv also feeds add")],
    )
    out = io.StringIO()
    render.folding(Console(file=out, width=1000, color_system=None), report, would=False)
    lines = out.getvalue().splitlines()
    assert lines == [
        "folded b0.bn into b0.conv, b1.bn into b1.conv, b2.bn into b2.conv and 2 more (5 in all, --json lists each; "
        "batchnorm)",
        "folded n into c (per-channel affine)",
        f"not folded s0.norm, s1.norm, s2.norm and 46 more (49 in all, --json lists each): {same}",
        "not folded bn: the output of conv also feeds add",
    ]
    assert len(report.to_dict()["not_folded"]) == 50
