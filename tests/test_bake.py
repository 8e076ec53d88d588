from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CATALOG, OUT_TOL, ROOT, fixture_input, load_fixture, rel_err
from torch.overrides import TorchFunctionMode

from wsfold.bake.baker import bake_model
from wsfold.bake.probe import OPS


class _CaptureWeights(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in OPS:
            self.weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **(kwargs or {}))


def exact_weight(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's own code computes when run in float64: the exact math, independent of wsfold's formulas."""
    import copy

    m64 = copy.deepcopy(module).double()
    cap = _CaptureWeights()
    with torch.no_grad(), cap:
        m64(x.double())
    return cap.weights[0]


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_baked_model_matches_original(name):
    model = load_fixture(name)
    baked, report = bake_model(model)
    dtype = CATALOG[name].get("dtype", torch.float32)
    for seed in range(3):
        x = fixture_input(name, seed=seed)
        with torch.no_grad():
            assert rel_err(baked(x), model(x)) < OUT_TOL[dtype]
    assert len(report.baked) == len(CATALOG[name]["layers"])


@pytest.mark.parametrize("name", ["variants", "dims", "functional_and_parametrized", "bit_tiny", "half", "bf16"])
def test_baked_weights_are_within_half_ulp_of_the_float64_formula(name):
    model = load_fixture(name)
    baked, report = bake_model(model)
    for b in report.baked:
        if b.layer.name in ("tr",) or b.layer.type == "DtypeEpsConv2d":
            # ConvTranspose needs a differently shaped probe; the dtype-eps layer picks another eps in float64.
            continue
        original = model.get_submodule(b.layer.name)
        in_ch = b.layer.weight_shape[1] * b.layer.geometry.get("groups", 1)
        probe = torch.randn(1, in_ch, *[12] * (len(b.layer.weight_shape) - 2))
        if b.layer.op == "linear":
            probe = torch.randn(2, b.layer.weight_shape[1])
        if b.layer.name == "0" and name == "functional_and_parametrized":
            probe = torch.randn(1, 3, 8, 8)
        exact = exact_weight(original, probe)
        got = baked.get_submodule(b.weight_key.rsplit(".", 1)[0]).weight
        # The spacing on the side where the exact value lies (it halves below a power of two).
        up = torch.nextafter(got, torch.full_like(got, float("inf"))).double() - got.double()
        down = got.double() - torch.nextafter(got, torch.full_like(got, float("-inf"))).double()
        ulp = torch.where(exact > got.double(), up, down)
        err = (got.double() - exact).abs()
        assert bool((err <= 0.5 * ulp + 1e-300).all()), (b.layer.name, (err / ulp).max().item())


def test_dtype_dependent_eps_is_baked_at_the_models_dtype():
    model = load_fixture("half")
    baked, report = bake_model(model)
    layer = next(b for b in report.baked if b.layer.type == "DtypeEpsConv2d").layer
    assert layer.eps == pytest.approx(1e-3)  # what float16 input makes it use, not the float32 branch's 1e-5
    x = fixture_input("half")
    with torch.no_grad():
        assert rel_err(baked(x), model(x)) < OUT_TOL[torch.float16]


def test_bake_does_not_mutate_its_input():
    model = load_fixture("variants").train()
    model[1].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    baked, _ = bake_model(model)
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert baked is not model
    # Both keep their train/eval modes (layers are baked while the model is probed in eval mode).
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(m.training == modes[n.split(".")[0] if n not in modes else n] for n, m in baked.named_modules())


def test_unsupported_layers_are_left_as_they_are():
    import models

    model = load_fixture("unsupported")
    baked, report = bake_model(model)
    assert isinstance(baked[1], models.SAConv2d) and isinstance(baked[2], models.InputScaledConv2d)
    assert type(baked[0]) is torch.nn.Conv2d


def test_same_padding_stride_2_is_correct_at_odd_and_even_sizes():
    model = load_fixture("bit_tiny")
    baked, _ = bake_model(model)
    for size in (31, 32, 33, 40):
        x = torch.randn(2, 3, size, size + 1)
        with torch.no_grad():
            assert rel_err(baked(x), model(x)) < 1e-5, size


def test_baked_layers_are_plain_torch_nn(tmp_path):
    baked, _ = bake_model(load_fixture("variants"))
    ws_types = {type(m).__module__ for m in baked.modules()}
    assert ws_types <= {"torch.nn.modules.container", "torch.nn.modules.conv", "torch.nn.modules.activation"}


def test_baked_pt_loads_without_the_ws_code(tmp_path):
    from conftest import arch_spec, ckpt
    from typer.testing import CliRunner

    from wsfold.cli.app import app  # noqa: F401 - the CLI is what users run

    out = tmp_path / "bit.baked.pt"
    result = CliRunner().invoke(
        app, ["bake", str(ckpt("bit_tiny")), "--arch", arch_spec("bit_tiny"), "-o", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    x = fixture_input("bit_tiny")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = load_fixture("bit_tiny")(x)
    torch.save(expected, tmp_path / "y.pt")
    code = (
        "import sys, torch; sys.modules.pop('models', None);"
        f"m = torch.load(r'{out}', weights_only=False); x = torch.load(r'{tmp_path / 'x.pt'}');"
        f"y = torch.load(r'{tmp_path / 'y.pt'}');"
        "assert not any(type(l).__module__ == 'models' for l in m.modules());"
        "err = ((m(x) - y).abs().max() / y.abs().max()).item(); assert err < 1e-5, err; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PATH": ""})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert ROOT  # the subprocess runs outside the repo, without fixtures/ on its path


def test_a_page_written_since_the_file_was_mapped_is_paged_out_not_dropped(tmp_path):
    """A private file mapping's page that the model wrote to is not the file's any more: unmapping it would
    bring the file's old bytes back, so the release of its range must keep the written values."""
    from wsfold.io.memory import FilePages, _only_file_pages

    src = tmp_path / "w.pt"
    torch.save({"w": torch.randn(256, 1024)}, src)
    w = torch.load(src, mmap=True, weights_only=True)["w"]
    float(w.sum())  # every page mapped, none written
    begin = w.data_ptr() // 4096 * 4096 + 4096
    end = (w.data_ptr() + w.numel() * 4) // 4096 * 4096
    if sys.platform != "linux" or not Path("/proc/self/pagemap").exists():
        pytest.skip("pagemap is Linux's")
    assert _only_file_pages(begin, end)
    w[100, 7] = 12345.0  # the model's own code writes to its weight: a private copy of that page
    assert not _only_file_pages(begin, end)
    assert FilePages(w).release()
    assert float(w[100, 7]) == 12345.0


def test_a_swapped_out_page_is_never_taken_for_one_of_the_files():
    """pagemap bits: 63 present, 62 swapped, 61 file page. Only ranges whose pages are all the file's (or were
    never touched) may be dropped; a swapped-out page is a private copy that dropping would lose."""
    import numpy as np

    from wsfold.io.memory import _all_file_pages

    present, swapped, file_page = 1 << 63, 1 << 62, 1 << 61
    assert _all_file_pages(np.array([present | file_page, 0, present | file_page], dtype=np.uint64))
    assert not _all_file_pages(np.array([present | file_page, present], dtype=np.uint64))
    assert not _all_file_pages(np.array([present | file_page, swapped | 123], dtype=np.uint64))


def test_the_exact_weight_may_take_the_place_of_the_observed_one():
    """Written over the observed weight block by block, the exact weight and the misfit are those computed
    into a fresh tensor; a misfit still counts every NaN the observed weight held."""
    from wsfold.bake.formulas import Formula, standardize_rounded

    torch.manual_seed(0)
    w = torch.randn(300, 50, 3, 3)
    f = Formula("V1", 1e-5)
    observed = torch.nn.functional.batch_norm(w.reshape(1, 300, -1), None, None, training=True, eps=1e-5)
    observed = observed.reshape_as(w)
    fresh = standardize_rounded(w, f, observed=observed, chunk_elems=4096)
    assert not torch.equal(fresh.weight, observed)  # float32 code and the float64 formula differ somewhere
    target = observed.clone()
    into = standardize_rounded(w, f, observed=target, chunk_elems=4096, out=target)
    assert into.weight is target and torch.equal(target, fresh.weight)
    assert into.misfit == fresh.misfit and 0 < fresh.misfit < 1e-6 and into.observed_nonfinite == 0
    bad = observed.clone()
    bad[3, 0, 0, 0] = bad[250, 1, 1, 1] = float("nan")
    counted = standardize_rounded(w, f, observed=bad, chunk_elems=4096, out=bad)
    assert counted.observed_nonfinite == 2 and counted.misfit == float("inf")


def test_a_derived_weight_the_layer_keeps_is_not_written_over_by_an_inplace_bake():
    """In place, an exact weight may reuse the memory of the weight the layer's code computed, but not when the
    layer keeps that tensor (a cache): it would then hold something its code did not compute."""
    import models

    class CachingStdConv2d(models.StdConv2d):
        def forward(self, x):
            w = torch.nn.functional.batch_norm(
                self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
            ).reshape_as(self.weight)
            self.cache = w
            return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(CachingStdConv2d(32, 32, 3, padding=1) for _ in range(3)))
    layers = list(model)
    with torch.no_grad():
        model(torch.randn(1, 32, 5, 5))
    computed = [layer.cache.clone() for layer in layers]
    baked, report = bake_model(model, inplace=True)
    assert len(report.baked) == 3
    assert any(not torch.equal(b.weight, c) for b, c in zip(baked, computed))  # the check below can fail
    for layer in layers[1:]:  # the first layer's last probe ran on a designed weight; the others' on their own
        w = torch.nn.functional.batch_norm(
            layer.weight.reshape(1, 32, -1), None, None, training=True, momentum=0.0, eps=layer.eps
        ).reshape_as(layer.weight)
        assert torch.equal(layer.cache, w)


def test_streaming_bake_hands_back_source_pages_and_leaves_the_source_intact(tmp_path):
    """An mmap-loaded source weight's pages are reclaimed once its layer is baked; the file and the tensor's
    content are untouched, and the input model (inplace=False) still computes what it did."""
    import hashlib

    import models

    from wsfold.io.memory import FilePages

    src = tmp_path / "m.pt"
    torch.manual_seed(0)
    model = torch.nn.Sequential(models.StdConv2d(64, 128, 3, padding=1), models.StdConv2d(128, 64, 3, padding=1))
    torch.save(model.state_dict(), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    sd = torch.load(src, mmap=True, weights_only=True)
    before = sd["0.weight"].clone()
    assert FilePages(sd["0.weight"]).release() and torch.equal(sd["0.weight"], before)
    assert not FilePages(before).release()  # anonymous memory is left alone

    loaded = models.StdConv2d(64, 128, 3, padding=1), models.StdConv2d(128, 64, 3, padding=1)
    original = torch.nn.Sequential(*loaded)
    original.load_state_dict(sd, assign=True)
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        expected = original(x)
        baked, report = bake_model(original)
        assert len(report.baked) == 2 and type(baked[0]) is torch.nn.Conv2d
        assert rel_err(baked(x), expected) < 1e-5 and torch.equal(original(x), expected)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


def _resident_pages(t: torch.Tensor) -> int:
    """How many whole pages of ``t``'s bytes are mapped in (pagemap bit 63)."""
    import numpy as np

    begin = -(-t.data_ptr() // 4096) * 4096
    end = (t.data_ptr() + t.numel() * t.element_size()) // 4096 * 4096
    with open("/proc/self/pagemap", "rb", buffering=0) as fh:
        fh.seek(begin // 4096 * 8)
        entries = np.frombuffer(fh.read((end - begin) // 4096 * 8), dtype=np.uint64)
    return int(np.count_nonzero(entries & np.uint64(1 << 63)))


def test_a_model_run_with_released_after_call_keeps_no_weight_resident_after_its_layer_ran(tmp_path):
    """verify runs the checkpoint's model with each module's memory-mapped weights handed back once it has run:
    the same outputs, no page of a weight left mapped after the run (each was mapped while its layer ran), and
    the hooks gone after the block."""
    import models

    from wsfold.io.memory import released_after_call

    if sys.platform != "linux" or not Path("/proc/self/pagemap").exists():
        pytest.skip("pagemap is Linux's")
    src = tmp_path / "m.pt"
    torch.manual_seed(0)
    layers = [models.StdConv2d(64, 128, 3, padding=1), torch.nn.ReLU(), models.StdConv2d(128, 64, 3, padding=1)]
    torch.save(torch.nn.Sequential(*layers).state_dict(), src)
    model = torch.nn.Sequential(
        models.StdConv2d(64, 128, 3, padding=1), torch.nn.ReLU(), models.StdConv2d(128, 64, 3, padding=1)
    )
    model.load_state_dict(torch.load(src, mmap=True, weights_only=True), assign=True)
    weights = [model[0].weight, model[2].weight]
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        expected = model(x)
        assert all(_resident_pages(w) > 0 for w in weights)
        seen = []
        model[2].register_forward_pre_hook(
            lambda m, a: seen.append((_resident_pages(weights[0]), len(model[0]._forward_hooks)))
        )
        with released_after_call(model):
            out = model(x)
        # The first layer's weight was handed back before the second ran, with no hook on the layer itself
        # (a module with hooks may run another code path: nn.TransformerEncoderLayer's fast path is off).
        assert seen == [(0, 0)]
        assert [_resident_pages(w) for w in weights] == [0, 0]
        assert torch.equal(out, expected) and torch.equal(model(x), expected)
    assert not torch.nn.modules.module._global_forward_hooks


def test_a_hook_registered_on_a_structural_copy_never_reaches_the_original():
    """verify and bake register hooks on their copies of the user's model (which share its tensors): the user's
    model must not carry them, while the hooks the user's model had still run on the copy."""
    from wsfold.bake.modeltree import structural_copy

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    calls = []
    model[0].register_forward_hook(lambda m, a, o: calls.append("user's"))
    copy = structural_copy(model)
    handle = copy[0].register_forward_hook(lambda m, a, o: calls.append("copy's"))
    copy[1].register_forward_pre_hook(lambda m, a: calls.append("copy's pre"))
    with torch.no_grad():
        model(torch.ones(1, 3))
        assert calls == ["user's"]
        copy(torch.ones(1, 3))
    assert calls == ["user's", "user's", "copy's", "copy's pre"]
    handle.remove()
    assert len(model[0]._forward_hooks) == 1 and not model[1]._forward_pre_hooks
