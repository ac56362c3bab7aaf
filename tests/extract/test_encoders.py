"""Encoders: the ResNet50 variants (parameter counts, torchvision weights), random init, the module/TorchScript hook."""

import numpy as np
import pytest
import torch

from milbench import MilbenchError
from milbench.extract.encoders import RANDOM_INIT, EncoderSpec, ResNet50, load_encoder

TINY = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_torchvision_and_clam():
    assert _count(ResNet50(4)) == 23_508_032  # torchvision resnet50 (25,557,032) without fc (2,049,000)
    assert _count(ResNet50(3)) == 8_543_296  # CLAM's resnet50_trunc (layer4 dropped)


@pytest.fixture(scope="module")
def torchvision_state(tmp_path_factory):
    """A checkpoint with torchvision's keys (fc included), as resnet50-19c8e357.pth has them."""
    torch.manual_seed(1)
    state = ResNet50(4).state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path_factory.mktemp("w") / "resnet50.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name, dim, kept", [("resnet50_trunc", 1024, "layer3.5.bn3.running_var"),
                                             ("resnet50", 2048, "layer4.2.conv3.weight")])
def test_weights_load_from_a_torchvision_state_dict(torchvision_state, name, dim, kept):
    path, state = torchvision_state
    enc = load_encoder(EncoderSpec(name, weights=path), "cpu", patch=32)
    assert enc.dim == dim and enc.weights == str(path.resolve())
    assert torch.equal(enc.module.state_dict()[kept], state[kept])
    assert enc(TINY).shape == (2, dim)


def test_a_wrapped_checkpoint_with_module_prefix_loads(torchvision_state, tmp_path):
    _, state = torchvision_state
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    enc = load_encoder(EncoderSpec("resnet50_trunc", weights=path), "cpu", patch=32)
    assert torch.equal(enc.module.conv1.weight, state["conv1.weight"])


def test_a_foreign_state_dict_is_rejected(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(MilbenchError, match="not a torchvision ResNet50 state_dict"):
        load_encoder(EncoderSpec("resnet50", weights=path), "cpu", patch=32)


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MILBENCH_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(MilbenchError, match=r"resnet50-19c8e357\.pth.*w/resnet50\.pth or pass --weights"):
        load_encoder(EncoderSpec("resnet50_trunc"), "cpu", patch=32)


def test_random_init_is_seeded_and_recorded():
    a = load_encoder(EncoderSpec("resnet50_trunc", random_init=True), "cpu", patch=32)
    b = load_encoder(EncoderSpec("resnet50_trunc", random_init=True), "cpu", patch=32)
    assert a.weights == RANDOM_INIT and a.attrs()["encoder_weights"] == RANDOM_INIT
    np.testing.assert_array_equal(a(TINY), b(TINY))


def test_factory_hook_with_its_own_preprocessing():
    spec = EncoderSpec("tests.extract.wsi:quadrant_means", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=16)
    enc = load_encoder(spec, "cpu", patch=32)
    assert spec.folder == "quadrant_means" and enc.dim == 12 and enc.input_size == 16
    white = enc(np.full((1, 32, 32, 3), 255, dtype=np.uint8))
    np.testing.assert_allclose(white, 1.0, atol=1e-6)  # (1 - 0.5) / 0.5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript is deprecated in torch 2.13, still loads
def test_torchscript_hook(tmp_path):
    from tests.extract.wsi import QuadrantMeans

    path = tmp_path / "qm.pt"
    torch.jit.save(torch.jit.script(QuadrantMeans()), path)
    enc = load_encoder(EncoderSpec(str(path)), "cpu", patch=32)
    assert EncoderSpec(str(path)).folder == "qm" and enc.dim == 12
    with pytest.raises(MilbenchError, match="TorchScript file and carries its weights"):
        load_encoder(EncoderSpec(str(path), weights=path), "cpu", patch=32)


@pytest.mark.parametrize("spec, message", [
    (EncoderSpec("vgg16"), "unknown encoder 'vgg16'"),
    (EncoderSpec("nosuch.module:make"), "cannot load encoder factory"),
    (EncoderSpec("collections:OrderedDict"), "returned a OrderedDict: it must return a torch.nn.Module"),
    (EncoderSpec("tests.extract.wsi:quadrant_means", random_init=True), "--random-init applies to"),
])
def test_bad_encoders_are_user_errors(spec, message):
    with pytest.raises(MilbenchError, match=message):
        load_encoder(spec, "cpu", patch=32)
