"""Checkpoints as users have them: trainer checkpoints with prefixes, model directories from the hubs' libraries."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import FIXTURES, OUT_TOL, arch_spec, ckpt, fixture_input, load_fixture, rel_err
from safetensors.torch import save_file
from typer.testing import CliRunner

import wsfold
from wsfold.cli.app import app

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None and importlib.util.find_spec("torchvision") is not None


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def bit_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_fixture("bit_tiny").state_dict().items()}


def test_state_key_walks_nested_dicts_then_prefixes(tmp_path):
    sd = bit_state_dict()
    src = tmp_path / "trainer.pt"
    torch.save({"epoch": 7, "ema": {f"ema_model.model.{k}": v for k, v in sd.items()}, "model": {}}, src)
    res = run("inspect", src, "--arch", arch_spec("bit_tiny"), "--state-key", "ema.ema_model.model", "--json")
    assert res.exit_code == 0, res.stderr
    assert [layer["name"] for layer in json.loads(res.stdout)["layers"]] == ["0", "5", "8", "11"]
    res = run("inspect", src, "--arch", arch_spec("bit_tiny"), "--state-key", "ema.ema_model.net", "--json")
    assert res.exit_code == 2 and "ema_model" in res.stderr and "start with" in res.stderr


def test_module_prefix_is_stripped_only_when_that_makes_the_state_dict_fit(tmp_path):
    arch = tmp_path / "wrapped.py"
    arch.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(FIXTURES)!r})\n"
        "from models import bit_tiny\n"
        "class Wrapper(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.module = bit_tiny()\n"
        "    def forward(self, x):\n"
        "        return self.module(x)\n"
    )
    sd = {f"module.{k}": v for k, v in bit_state_dict().items()}
    src = tmp_path / "wrapped.pt"
    torch.save(sd, src)
    # The architecture's own keys start with "module.": nothing is stripped.
    res = run("inspect", src, "--arch", f"{arch}:Wrapper", "--json")
    assert res.exit_code == 0, res.stderr
    # A DataParallel checkpoint of the plain architecture: "module." is stripped.
    res = run("inspect", src, "--arch", arch_spec("bit_tiny"), "--json")
    assert res.exit_code == 0, res.stderr


def _fixture_dir(tmp_path, config: dict, weights: str = "model.safetensors"):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    sd = bit_state_dict()
    if weights == "model.safetensors":
        save_file(sd, str(folder / weights))
    elif weights == "sharded":
        keys = sorted(sd)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for name, part in shards.items():
            save_file({k: sd[k] for k in part}, str(folder / name))
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("weights", ["model.safetensors", "sharded", "pytorch_model.bin"])
def test_a_model_directory_with_arch_reads_each_weight_layout(tmp_path, weights):
    folder = _fixture_dir(tmp_path, {}, weights)
    prepared = wsfold.prepare(folder, arch=arch_spec("bit_tiny"))
    x = fixture_input("bit_tiny")
    with torch.no_grad():
        assert rel_err(prepared.model(x), load_fixture("bit_tiny")(x)) < OUT_TOL[torch.float32]


@pytest.mark.parametrize(
    "config,needle",
    [({"hidden_size": 3}, "names no architecture"), ({"architectures": ["NoSuchModelAnywhere"]}, "does not have")],
)
def test_a_model_directory_that_names_no_usable_architecture_is_exit_2(tmp_path, config, needle):
    if "architectures" in config and not HAS_TRANSFORMERS:
        needle = "wsfold[hf]"
    folder = _fixture_dir(tmp_path, config)
    res = run("inspect", folder)
    assert res.exit_code == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_directory_without_config_is_exit_2(tmp_path):
    res = run("inspect", tmp_path)
    assert res.exit_code == 2 and "config.json" in res.stderr


def test_a_timm_directory_needs_timm_and_says_which_extra(tmp_path):
    if HAS_TIMM:
        pytest.skip("timm is importable: the directory is read for real in test_timm_directory")
    folder = _fixture_dir(tmp_path, {"architecture": "nf_regnet_b0", "num_classes": 10, "model_args": {}})
    res = run("export", folder, "--onnx", tmp_path / "m.onnx")
    assert res.exit_code == 2, res.stderr
    assert "timm" in res.stderr and "wsfold[timm]" in res.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(not HAS_TIMM, reason="timm (and torchvision) cannot be imported here")
def test_timm_directory(tmp_path):  # pragma: no cover - runs where timm is installed
    import timm

    model = timm.create_model("nf_regnet_b0", pretrained=False, num_classes=10).eval()
    timm.models.push_to_hf_hub  # noqa: B018 - the save_for_hf helper lives next to it
    from timm.models._hub import save_for_hf

    save_for_hf(model, tmp_path / "nf")
    assert run("export", tmp_path / "nf", "--onnx", tmp_path / "nf.onnx", "-q").exit_code == 0
    assert run("verify", tmp_path / "nf", "--onnx", tmp_path / "nf.onnx", "-q").exit_code == 0


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'wsfold[hf]')")
def test_transformers_bit_directory_exports_and_verifies_without_arch(tmp_path):
    import transformers

    config = transformers.BitConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="preactivation",
        global_padding="SAME",
        num_labels=5,
        image_size=32,
        num_groups=4,
    )
    torch.manual_seed(0)
    transformers.BitForImageClassification(config).eval().save_pretrained(tmp_path / "bit")
    res = run("inspect", tmp_path / "bit", "--json")
    assert res.exit_code == 0, res.stderr
    layers = json.loads(res.stdout)["layers"]
    assert len(layers) == 9 and {layer["formula"] for layer in layers} == {"V1"}
    res = run("export", tmp_path / "bit", "--onnx", tmp_path / "bit.onnx", "--json")
    assert res.exit_code == 0, res.stderr
    assert [i["name"] for i in json.loads(res.stdout)["inputs"]] == ["pixel_values"]
    res = run("verify", tmp_path / "bit", "--onnx", tmp_path / "bit.onnx", "--json")
    assert res.exit_code == 0, res.stdout[-2000:]
    payload = json.loads(res.stdout)
    assert payload["passed"] and payload["layers"] and all(layer["passed"] for layer in payload["layers"])


def test_a_hub_id_is_not_a_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("inspect", "google/bit-50")
    assert res.exit_code == 2 and "no such file" in res.stderr
    assert ckpt("bit_tiny").exists()


def test_a_checkpoint_holding_several_state_dicts_says_which_it_used(tmp_path):
    sd = bit_state_dict()
    src = tmp_path / "both.pt"
    torch.save({"model": sd, "ema": {k: v.clone() for k, v in sd.items()}}, src)
    res = run("inspect", src, "--arch", arch_spec("bit_tiny"), "--json")
    assert res.exit_code == 0, res.stderr
    payload = json.loads(res.stdout)
    assert payload["state_key"] == "model" and "--state-key ema" in payload["notes"][0]
    for bad in ("", ".", "a..b"):
        res = run("inspect", src, "--arch", arch_spec("bit_tiny"), "--state-key", bad)
        assert res.exit_code == 2 and "empty part" in res.stderr


def test_a_baked_file_refuses_a_strict_load_into_the_original_and_a_wrong_arch(tmp_path):
    from safetensors.torch import load_file

    baked = tmp_path / "ws_bn.baked.safetensors"
    assert run("bake", ckpt("ws_bn"), "--arch", arch_spec("ws_bn"), "-o", baked, "-q").exit_code == 0
    with pytest.raises(RuntimeError, match="wsfold_baked"):
        load_fixture("ws_bn").load_state_dict(load_file(str(baked)))
    res = run("inspect", baked, "--arch", arch_spec("bit_tiny"))
    assert res.exit_code == 2 and "does not fit" in res.stderr, res.stderr
    with pytest.raises(wsfold.WsfoldError):
        wsfold.load_baked(baked, arch=arch_spec("bit_tiny"))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'wsfold[hf]')")
@pytest.mark.parametrize("name", ["set_seed", "pipeline", "AutoModel", "BitConfig", "__class__"])
def test_a_directory_naming_a_transformers_callable_that_is_not_a_model_class_is_refused(tmp_path, name):
    folder = _fixture_dir(tmp_path, {"architectures": [name], "model_type": "bit"})
    res = run("inspect", folder)
    assert res.exit_code == 2, res.stderr
    assert "not a transformers model class" in res.stderr or "does not have" in res.stderr


def test_a_safetensors_checkpoint_is_mapped_not_read_and_each_tensor_has_its_own_storage(tmp_path):
    """Tensors view a private mapping of the file: equal to what safetensors reads, each on a storage of its own
    bytes (saving one does not write the whole file), and a write to one does not reach the file."""
    from safetensors import safe_open

    from wsfold.io.memory import _file_mapping_of
    from wsfold.load.read import read_checkpoint

    torch.manual_seed(0)
    sd = {"a": torch.randn(64, 32, 3, 3), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(7).half()}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    before = path.read_bytes()
    tensors, _ = read_checkpoint(path)
    with safe_open(str(path), framework="pt") as fh:
        for key in sd:
            assert torch.equal(tensors[key], fh.get_tensor(key)) and tensors[key].dtype == sd[key].dtype
    for t in tensors.values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert _file_mapping_of(tensors["a"].data_ptr()) is not None
    tensors["a"][0, 0, 0, 0] = 123.0
    assert path.read_bytes() == before


def test_a_safetensors_file_whose_tensors_are_not_aligned_is_read_as_copies(tmp_path):
    from wsfold.load.read import _mapped_safetensors, read_checkpoint

    # Written by hand: safetensors' own writer puts wider dtypes first, so its files are aligned.
    b = torch.randn(5)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    header["b"] = {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes([1, 1, 1]) + b.numpy().tobytes())
    assert _mapped_safetensors(path, ["a", "b"]) is None  # b starts 3 bytes into the data: no float view there
    tensors, _ = read_checkpoint(path)
    assert torch.equal(tensors["a"], torch.ones(3, dtype=torch.uint8)) and torch.equal(tensors["b"], b)


ARCH_WITH_RANDOM_INIT = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out")  # as timm's ResNetV2 does
        nn.init.normal_(tensor=self.fc.weight, std=0.01)
        self.fc.bias.data.normal_(0.0, 0.02)  # as transformers' _init_weights do
        self.register_buffer("code", torch.randn(5, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("table", torch.rand(2, 3, device="cpu"))  # asked for on the CPU: kept as asked

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def net():
    return Net()
"""


def test_random_init_is_skipped_on_the_meta_device_and_the_checkpoint_fills_the_model(tmp_path):
    """On the meta device there is nothing to fill, and torch's meta fills import torch._dynamo (~2 s): an
    architecture whose constructor initializes randomly loads without it, holding exactly the checkpoint."""
    import subprocess
    import sys

    arch = tmp_path / "net.py"
    arch.write_text(ARCH_WITH_RANDOM_INIT)
    spec = importlib.util.spec_from_file_location("net_arch", arch)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    sd = module.net().state_dict()
    torch.save(sd, tmp_path / "net.pt")
    code = (
        "import sys, torch\n"
        "from wsfold.load.checkpoint import load_model\n"
        f"model = load_model({str(tmp_path / 'net.pt')!r}, arch={str(arch) + ':net'!r}).model\n"
        f"sd = torch.load({str(tmp_path / 'net.pt')!r})\n"
        "same = all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())\n"
        "print(same, 'torch._dynamo' in sys.modules, model.table.is_meta)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "False"]


def test_random_values_asked_for_off_the_meta_device_are_random():
    """Only tensors the meta device would hold are left unfilled; a constructor that asks for the CPU (a nested
    device context, as set_default_device gives) gets real random values, not uninitialized memory."""
    from wsfold.load.build import _NoRandomFill

    with torch.device("meta"), _NoRandomFill():
        assert torch.randn(3).is_meta and torch.rand(2, 2, generator=torch.Generator()).is_meta
        with torch.device("cpu"):
            torch.manual_seed(0)
            values = torch.randn(10000)
    torch.manual_seed(0)
    assert not values.is_meta and torch.equal(values, torch.randn(10000))


def test_bake_of_a_model_directory_given_as_dot_writes_beside_it(tmp_path, monkeypatch):
    """`wsfold bake .` inside a model directory: the default output is <directory name>.baked.safetensors beside
    it (the name '.' has none of its own: it was a ValueError called a bug)."""
    from typer.testing import CliRunner

    from wsfold.cli.app import app

    folder = _fixture_dir(tmp_path, {})
    monkeypatch.chdir(folder)
    res = CliRunner().invoke(app, ["bake", ".", "--arch", arch_spec("bit_tiny"), "-q"])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "model.baked.safetensors").exists()
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder / "sub")
    res = CliRunner().invoke(app, ["bake", "..", "--arch", arch_spec("bit_tiny"), "-q", "--force"])
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (folder / "sub").iterdir()) == []
