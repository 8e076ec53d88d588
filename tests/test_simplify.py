"""Exact simplifications of the exported graph: identity arithmetic and batch-independent shapes go, the
function and every weight stay."""

from __future__ import annotations

import collections

import numpy as np
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


class ShapeHeavy(nn.Module):
    """What the TorchScript exporter writes as shape arithmetic: a TF-SAME pad computed from the input's size, a
    head size and an attention scale read off a shape, a class token expanded to the batch, a time embedding
    unsqueezed twice, an upsample concatenated with its skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.out = nn.Conv2d(32, 16, 1)
        self.time = nn.Linear(4, 16)
        self.qkv = nn.Linear(16, 48)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.heads = 2

    def forward(self, x, t):
        ih, iw = x.shape[-2:]
        # (ih + 1) // 2, not -(-ih // 2): TorchScript writes Python's // on a negative int as ONNX's truncating Div
        ph, pw = max(((ih + 1) // 2 - 1) * 2 + 3 - ih, 0), max(((iw + 1) // 2 - 1) * 2 + 3 - iw, 0)
        x = self.stem(nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))
        x = x + self.time(t)[:, :, None, None]
        skip = x
        x = nn.functional.interpolate(nn.functional.avg_pool2d(self.mid(x), 2), scale_factor=2.0)
        x = self.out(torch.cat([x, skip], dim=1))
        b, c, h, w = x.shape
        tokens = torch.cat([self.cls.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        n = tokens.shape[1]
        q, k, v = self.qkv(tokens).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def test_batch_independent_shape_arithmetic_becomes_constants_with_either_exporter(tmp_path):
    torch.manual_seed(0)
    model = ShapeHeavy().eval()
    for exporter in ("torchscript", "dynamo"):
        path = tmp_path / f"{exporter}.onnx"
        export_onnx(model, path, input_shapes=[(1, 3, 15, 15), (1, 4)], exporter=exporter)
        counts = ops(path)
        # What is left reads the batch alone: the class token's expand.
        assert counts["Shape"] <= 1 and counts["Pad"] == 0 and counts["Sqrt"] == 0, (exporter, counts)
        assert counts["Unsqueeze"] <= 2 and counts["Cast"] == 0, (exporter, counts)
        result = verify_onnx(model, path, samples=2)
        assert result, (exporter, result.summary() if hasattr(result, "summary") else result)
        assert any(shape[0][0] != 1 for shape in result.batch_input_shapes)  # a batch other than 1 was run


def test_a_zero_pad_before_a_maxpool_is_not_fused_and_keeps_its_guard(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ZeroPad2d(1), nn.MaxPool2d(3, 2)).eval()
    path = tmp_path / "pool.onnx"
    export_onnx(model, path, input_shapes=[(1, 3, 9, 9)])
    graph = onnx.load(str(path)).graph
    assert ops(path)["Pad"] == 1
    assert any(t.name.endswith("_neg_zero") for t in graph.initializer)
    assert verify_onnx(model, path, samples=2)


def _unsqueeze_chain(first: list[int], second: list[int], rank: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Unsqueeze", ["x", "a"], ["y"]),
        helper.make_node("Unsqueeze", ["y", "b"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(range(2, 2 + rank)))],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array(first, dtype=np.int64), "a"),
            numpy_helper.from_array(np.array(second, dtype=np.int64), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_two_unsqueezes_merge_into_one_that_gives_the_same_tensor():
    from onnx.reference import ReferenceEvaluator

    from wsfold.onnx.simplify import merge_unsqueezes

    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for first, second in (([2], [3]), ([0], [0]), ([1, 3], [0]), ([0], [2, 4]), ([2], [1]), ([1, 2], [1, 3])):
        proto = _unsqueeze_chain(first, second, 2)
        expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
        assert merge_unsqueezes(proto) == 1 and len(proto.graph.node) == 1
        got = ReferenceEvaluator(proto).run(None, {"x": x})[0]
        assert got.shape == expected.shape and np.array_equal(got, expected), (first, second)
    assert merge_unsqueezes(_unsqueeze_chain([-1], [0], 2)) == 0  # negative axes: left alone


def test_a_value_a_subgraph_reads_is_neither_merged_away_nor_dropped():
    """An If body that reads the outer graph's values by name: the passes see it read, though no main-graph node
    lists it."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from wsfold.onnx.simplify import drop_dead_nodes, merge_unsqueezes

    body = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Unsqueeze", ["x", "a"], ["y"]),  # read by the outer Unsqueeze and by the If's body
        helper.make_node("Unsqueeze", ["y", "b"], ["z"]),
        helper.make_node("Unsqueeze", ["x", "b"], ["w"]),  # read by the else body alone
        helper.make_node("If", ["c"], ["branch"], then_branch=body, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "outer",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("branch", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "a"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "b"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    expected = [ReferenceEvaluator(proto).run(None, {"x": x, "c": np.array(c)}) for c in (True, False)]
    assert merge_unsqueezes(proto) == 0
    assert drop_dead_nodes(proto) == 0 and len(proto.graph.node) == 4
    for c, want in zip((True, False), expected):
        got = ReferenceEvaluator(proto).run(None, {"x": x, "c": np.array(c)})
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_a_squeeze_of_an_unsqueeze_of_the_same_axes_goes_either_way_round():
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from wsfold.onnx.simplify import drop_no_ops

    x = np.random.default_rng(0).standard_normal((2, 1, 3)).astype(np.float32)
    for first, second, axes, back in (
        ("Unsqueeze", "Squeeze", [0, -1], [0, -1]),
        ("Squeeze", "Unsqueeze", [1], [1]),
        ("Unsqueeze", "Squeeze", [0], [2]),  # another axis: (1, 2, 1, 3) -> (1, 2, 3), not a no-op
    ):
        graph = helper.make_graph(
            [
                helper.make_node(first, ["x", "a"], ["y"]),
                helper.make_node(second, ["y", "b"], ["z"]),
                helper.make_node("Relu", ["z"], ["out"]),
            ],
            "pair",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
            [
                numpy_helper.from_array(np.array(axes, dtype=np.int64), "a"),
                numpy_helper.from_array(np.array(back, dtype=np.int64), "b"),
            ],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
        same = axes == back
        assert drop_no_ops(proto) == (1 if same else 0)
        assert len(proto.graph.node) == (1 if same else 3), (first, axes, back)
        assert np.array_equal(ReferenceEvaluator(proto).run(None, {"x": x})[0], expected)


def test_shape_arithmetic_is_folded_as_onnx_computes_it_not_as_onnxruntimes_shape_inference_guesses():
    """onnxruntime's symbolic shape inference floors every Div; ONNX truncates (-15 / 2 is -7). A size computed
    through a negative Div is left to run (or to ONNX's reference evaluator), so the graph computes what it did."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from wsfold.onnx.graph import fold_constant_nodes
    from wsfold.onnx.simplify import fold_known_shapes, fold_static_shapes

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "last"], ["width"], axis=0),  # 15
        helper.make_node("Neg", ["width"], ["minus"]),
        helper.make_node("Div", ["minus", "half"], ["quotient"]),  # ONNX: -7; floored: -8
        helper.make_node("Neg", ["quotient"], ["end"]),
        helper.make_node("Unsqueeze", ["end", "zero"], ["ends"]),
        helper.make_node("Slice", ["x", "zero", "ends", "axis"], ["cut"]),
        helper.make_node("Relu", ["cut"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "negative_div",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 15])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array(2, dtype=np.int64), "last"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis"),
            numpy_helper.from_array(np.array(2, dtype=np.int64), "half"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(0).standard_normal((2, 3, 15)).astype(np.float32)

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
            0
        ]

    before = run(proto)
    assert before.shape == (2, 3, 7)
    assert fold_known_shapes(proto) == 1  # the Gather of the Shape: 15, whatever the batch
    fold_constant_nodes(proto)
    fold_static_shapes(proto)
    after = run(proto)
    assert after.shape == before.shape and np.array_equal(after, before)
    assert not any(n.op_type == "Shape" for n in proto.graph.node)


def test_a_reshape_target_made_in_a_later_round_takes_a_name_of_its_own():
    """Each round of fold_static_shapes names its targets: a second round reused the first one's names, and the
    graph held two initializers of one name (a diffusion U-Net exported by TorchScript failed shape inference)."""
    from onnx import TensorProto, helper, numpy_helper

    from wsfold.onnx.simplify import fold_static_shapes

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        helper.make_node("Add", ["y", "wsfold_shape_0"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rounds",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.ones(4, dtype=np.float32), "wsfold_shape_0")],  # an earlier round's name
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert fold_static_shapes(proto) == 1
    names = [t.name for t in proto.graph.initializer]
    assert len(names) == len(set(names)), names
    onnx.checker.check_model(proto, full_check=True)


class NegativeFloorDivision(nn.Module):
    """A TF-SAME pad computed with -(-ih // 2): TorchScript writes Python's // on the negative int as ONNX's
    truncating Div, so the graph's pad is not the one torch traced, and its upsampled branch no longer matches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.side = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        ih = x.shape[-2]
        ph = max((-(-ih // 2) - 1) * 2 + 3 - ih, 0)
        y = self.conv(nn.functional.pad(x, [ph // 2, ph - ph // 2, ph // 2, ph - ph // 2]))
        return torch.cat([y, nn.functional.interpolate(self.side(y)[:, :, ::2, ::2], scale_factor=2.0)], 1)


def test_a_graph_whose_shapes_contradict_each_other_is_refused_not_rewritten(tmp_path):
    """wsfold folds shapes as ONNX computes them, so it does not silently repair (or break) the exporter's graph:
    TorchScript's is refused with the checker's line (exit 2), dynamo's exports and verifies."""
    from wsfold.errors import ExportError

    torch.manual_seed(0)
    model = NegativeFloorDivision().eval()
    out = tmp_path / "ts.onnx"
    try:
        export_onnx(model, out, input_shapes=[(1, 3, 15, 15)], exporter="torchscript")
    except ExportError as exc:
        assert "onnx.checker rejects" in str(exc) and exc.exit_code == 2
    else:
        raise AssertionError("a graph whose shapes contradict each other was written")
    assert not out.exists()
    path = tmp_path / "dynamo.onnx"
    export_onnx(model, path, input_shapes=[(1, 3, 15, 15)], exporter="dynamo")
    assert verify_onnx(model, path, samples=2)


def test_expand_to_the_batch_keeps_its_batch_and_loses_its_minus_one_check():
    """Where(Equal(v, -1), 1, v) over v = [batch, -1, -1] (TorchScript's expand(b, -1, -1), einops' repeat): the
    batch is a dim, never -1, so the check is known; the Where becomes [batch, 1, 1] and the Equal goes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from wsfold.onnx.simplify import fold_known_shapes

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "first"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "minus_one", "minus_one"], ["wanted"], axis=0),
        helper.make_node("Equal", ["wanted", "all_minus_one"], ["keep"]),
        helper.make_node("Where", ["keep", "ones", "wanted"], ["size"]),
        helper.make_node("Expand", ["token", "size"], ["tokens"]),
        helper.make_node("Concat", ["tokens", "x"], ["y"], axis=1),
    ]
    ints = {"first": np.array(0), "zero": np.array([0]), "minus_one": np.array([-1])}
    ints |= {"all_minus_one": np.array([-1, -1, -1]), "ones": np.array([1, 1, 1])}
    graph = helper.make_graph(
        nodes,
        "expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 4])],
        [numpy_helper.from_array(v.astype(np.int64), k) for k, v in ints.items()]
        + [numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 1, 4), "token")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
            0
        ]

    before = run(proto)
    assert fold_known_shapes(proto) >= 2
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Equal"] == 0 and ops["Where"] == 0 and ops["Shape"] == 1, ops  # the batch is still read
    onnx.checker.check_model(proto, full_check=True)
    assert np.array_equal(run(proto), before)


class SizedUpsample(nn.Module):
    """F.interpolate(size=twice the input's): TorchScript computes the sizes from the shape; folded, they are half a
    constant and half read off a shape, which onnx.checker's shape inference (no data propagation) cannot size."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.first(x)
        up = nn.functional.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="nearest")
        return torch.cat([up, self.second(up)], 1)


def test_a_resize_to_a_size_read_off_the_shape_exports_and_verifies_with_either_exporter(tmp_path):
    """(It was refused by onnx.checker's full check, a graph onnxruntime runs right.)"""
    torch.manual_seed(0)
    model = SizedUpsample().eval()
    for exporter in ("torchscript", "dynamo"):
        path = tmp_path / f"{exporter}.onnx"
        export_onnx(model, path, input_shapes=[(1, 3, 15, 17)], exporter=exporter)
        assert verify_onnx(model, path, samples=2), exporter
