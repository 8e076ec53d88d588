"""Exact simplifications of the exported graph: identity arithmetic and batch-independent shapes go, the
function and every weight stay."""

from __future__ import annotations

import collections

import onnx
import torch
from torch import nn

from wsfold.onnx.export import export_onnx
from wsfold.verify.verification import verify_onnx


class GNBlock(nn.Module):
    def __init__(self, trained: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Conv2d(16, 4, 1)
        if trained:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


def ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_a_groupnorm_at_its_initial_affine_loses_its_identity_mul_and_add(tmp_path):
    torch.manual_seed(0)
    fresh, trained = GNBlock(False).eval(), GNBlock(True).eval()
    for model, name in ((fresh, "fresh"), (trained, "trained")):
        path = tmp_path / f"{name}.onnx"
        export_onnx(model, path, input_shapes=[(1, 3, 8, 8)])
        counts = ops(path)
        assert counts["Shape"] == 0, counts  # the reshape back to (N, C, H, W) is a constant target
        expected = 0 if name == "fresh" else 1
        assert counts["Mul"] == expected and counts["Add"] == expected, (name, counts)
        assert verify_onnx(model, path, samples=2)


def test_shapes_that_depend_on_the_spatial_size_stay_with_dynamic_hw(tmp_path):
    torch.manual_seed(0)
    model = GNBlock(True).eval()
    path = tmp_path / "dyn.onnx"
    export_onnx(model, path, input_shapes=[(1, 3, 8, 8)], dynamic_hw=True)
    assert ops(path)["Shape"] >= 1
    result = verify_onnx(model, path, samples=2)
    assert result and any(shape[0][2] != 8 for shape in result.batch_input_shapes)
