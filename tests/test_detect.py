from __future__ import annotations

import math

import pytest
import torch
from conftest import CATALOG, load_fixture

from wsfold.detect import detect_layers, tf_same_pad
from wsfold.formulas import Formula, identify_formula, standardize


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_finds_exactly_the_ws_layers_with_formula_and_eps(name):
    det = detect_layers(load_fixture(name))
    expected = CATALOG[name]["layers"]
    assert {layer.name for layer in det.layers} == set(expected)
    for layer in det.layers:
        formula, eps = expected[layer.name]
        assert layer.formula_name == formula, layer.name
        assert math.isclose(layer.eps, eps, rel_tol=1e-9), (layer.name, layer.eps, eps)
    assert {u.name for u in det.unsupported} == CATALOG[name].get("unsupported", set())
    assert det.unprobed == []


def test_unsupported_layers_say_why():
    det = detect_layers(load_fixture("unsupported"))
    reasons = {u.name: u.reason for u in det.unsupported}
    assert "2 ops" in reasons["1"] and "not one plain op" in reasons["1"]
    assert "depends on the input" in reasons["2"]


def test_detection_does_not_depend_on_class_names():
    """The same math under an unrelated class name (not a Conv subclass) is found the same way."""
    import models

    Anonymous = type("Blob", (torch.nn.Module,), {"forward": models.FunctionalWS.forward})
    blob = Anonymous()
    blob.w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    blob.b = torch.nn.Parameter(torch.zeros(4))
    det = detect_layers(torch.nn.Sequential(blob))
    assert [(layer.name, layer.type, layer.formula_name, layer.eps) for layer in det.layers] == [
        ("0", "Blob", "V3", 1e-5)
    ]


def test_plain_model_has_no_derived_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    det = detect_layers(model)
    assert det.layers == [] and det.unsupported == []


def test_warnings_for_small_fan_in_and_low_variance_filters():
    import models

    conv = models.StdConv2d(4, 4, 3, groups=4, eps=1e-6)
    with torch.no_grad():
        conv.weight[0] = 1e-5 * torch.randn(1, 3, 3)  # variance ~1e-10 < eps
    det = detect_layers(torch.nn.Sequential(conv))
    warnings = det.layers[0].warnings
    assert any("fan-in 9 < 16" in w for w in warnings)
    assert any("1 filter(s) with variance below eps=1e-06" in w for w in warnings)


def test_same_padding_is_recognised_as_dynamic():
    det = detect_layers(load_fixture("bit_tiny"))
    stem = next(layer for layer in det.layers if layer.name == "0")
    assert stem.pad is not None and stem.pad.same_dynamic


@pytest.mark.parametrize(
    ("size", "k", "s", "expected"),
    [
        ((8, 8), (3, 3), (2, 2), (0, 1, 0, 1)),
        ((8, 8), (7, 7), (2, 2), (2, 3, 2, 3)),
        ((9, 9), (3, 3), (1, 1), (1, 1, 1, 1)),
    ],
)
def test_tf_same_pad_matches_ws_variants_table(size, k, s, expected):
    assert tf_same_pad(size, k, s, (1, 1)) == expected


def test_identify_returns_none_for_a_non_affine_derivation():
    raw = torch.randn(4, 3, 3, 3)
    assert identify_formula([(raw, torch.tanh(raw))], {}, {}, []) is None


def test_standardize_v1_matches_textbook_formula():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    flat = w.reshape(5, -1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(standardize(w, Formula("V1", 1e-5)), expected.reshape_as(w), rtol=0, atol=1e-14)
