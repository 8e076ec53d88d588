from __future__ import annotations

import math

import pytest
import torch
from conftest import CATALOG, load_fixture

from wsfold.bake.detect import detect_layers
from wsfold.bake.formulas import Formula, identify_formula, standardize
from wsfold.bake.modules import tf_same_pad


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


class ShapeEpsConv2d(torch.nn.Conv2d):
    """Same class and attributes, different math by size: eps 1e-5 up to 8 filters, 1e-3 above."""

    def forward(self, x):
        eps = 1e-5 if self.weight.shape[0] <= 8 else 1e-3
        v, m = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return torch.nn.functional.conv2d(x, (self.weight - m) / torch.sqrt(v + eps), self.bias, self.stride, 1)


def test_layers_of_one_signature_are_probed_fully_once_and_each_checked_on_its_weight():
    import models

    model = torch.nn.Sequential(
        models.StdConv2d(3, 8, 3, padding=1, eps=1e-6),
        models.StdConv2d(8, 16, 1, eps=1e-6),
        models.StdConv2d(16, 16, 3, stride=2, eps=1e-6),
        models.StdConv2d(16, 4, 3, eps=1e-4),  # another eps: another signature
    )
    det = detect_layers(model)
    assert [(l.name, l.probed_as, l.eps) for l in det.layers] == [
        ("0", None, 1e-6),
        ("1", "0", 1e-6),
        ("2", "0", 1e-6),
        ("3", None, 1e-4),
    ]
    assert all(l.misfit <= 48 * torch.finfo(torch.float32).eps for l in det.layers)


def test_a_layer_that_does_not_fit_its_signatures_formula_is_probed_fully():
    model = torch.nn.Sequential(ShapeEpsConv2d(3, 8, 3), ShapeEpsConv2d(8, 32, 3))
    with torch.no_grad():
        model[1].weight.mul_(0.3)  # variance ~4e-4: eps 1e-3 vs 1e-5 is far outside rounding
    det = detect_layers(model)
    assert [(l.name, l.probed_as, l.eps) for l in det.layers] == [("0", None, 1e-5), ("1", None, 1e-3)]


def test_a_module_that_changes_the_ops_output_is_not_taken_for_the_op():
    """Probes do not compute the op (a random stand-in of its output shape is returned): a module that scales
    the output must still be told apart from one that returns it."""
    import models

    class Scaled(models.StdConv2d):
        def forward(self, x):
            return super().forward(x) * 2.0

    det = detect_layers(torch.nn.Sequential(Scaled(3, 4, 3)))
    assert det.layers == [] and "more than one op" in det.unsupported[0].reason
