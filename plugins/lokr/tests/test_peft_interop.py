"""LoKr adapters move between peftkit and PEFT with the same tensors and outputs, both ways."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.serialization import read_tensors
from peftkit.testing.models import randomize_trainable, tiny_llama, tiny_plain
from peftkit_lokr import LoKrConfig
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)


class TinyConvNet(nn.Module):
    """Conv2d layers of several kinds (3x3, strided and grouped, 1x1) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, groups=2)
        self.pointwise = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.pointwise(h).mean(dim=(2, 3)))


def llama():
    return tiny_llama(hidden_size=64)  # 64 = 8 · 8: room for both full and factored W1 and W2


CONV_TARGETS = ["conv1", "conv2", "pointwise", "head"]

# name: (model builder, config fields, the tensor names one adapted layer must hold, as PEFT makes them)
CASES = {
    "llama-full-factors": (llama, dict(r=8, target_modules="all-linear"), ("q_proj", {"lokr_w1", "lokr_w2"})),
    "llama-factored-w2": (
        llama,
        dict(r=2, target_modules="all-linear"),
        ("q_proj", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ),
    "llama-decompose-both": (
        llama,
        dict(r=2, decompose_both=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        ("q_proj", {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ),
    "llama-decompose-factor": (
        llama,
        dict(r=2, decompose_factor=4, decompose_both=True, target_modules=["q_proj", "up_proj"]),
        ("up_proj", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ),
    # r = 16 reaches half of every factor's larger side: all factors stay full, even with decompose_both
    "llama-large-r": (
        llama,
        dict(r=16, alpha=4, decompose_both=True, target_modules=["k_proj", "o_proj"]),
        ("k_proj", {"lokr_w1", "lokr_w2"}),
    ),
    "llama-patterns": (
        llama,
        dict(
            r=2,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 8, r"layers\.1\.mlp\.down_proj": 1},
            alpha_pattern={"q_proj": 32},
            layers_to_transform=[1],
        ),
        ("v_proj", {"lokr_w1", "lokr_w2"}),
    ),
    "conv-effective": (
        TinyConvNet,
        dict(r=2, use_effective_conv2d=True, target_modules=CONV_TARGETS),
        ("conv1", {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    ),
    "conv-flat": (
        TinyConvNet,
        dict(r=2, target_modules=CONV_TARGETS),
        ("conv1", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ),
    "conv-decompose-both-factor": (
        TinyConvNet,
        dict(
            r=1,
            decompose_both=True,
            decompose_factor=4,
            use_effective_conv2d=True,
            target_modules=CONV_TARGETS,
        ),
        ("conv2", {"lokr_w1_a", "lokr_w1_b", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    ),
    "conv-large-r": (
        TinyConvNet,
        dict(r=16, use_effective_conv2d=True, target_modules=CONV_TARGETS),
        ("conv2", {"lokr_w1", "lokr_w2"}),
    ),
    "conv1d-effective": (
        tiny_plain,
        dict(r=2, use_effective_conv2d=True, target_modules=["conv", "fc1"]),
        ("conv", {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    ),
    # a Conv1d with a full 3-d W2: PEFT combines it with torch.kron as a 2-d by 3-d product
    "conv1d-large-r": (
        tiny_plain,
        dict(r=8, use_effective_conv2d=True, target_modules=["conv"]),
        ("conv", {"lokr_w1", "lokr_w2"}),
    ),
}


def inputs_for(model):
    generator = torch.Generator().manual_seed(1)
    if isinstance(model, TinyConvNet) or isinstance(getattr(model, "base_model", None), TinyConvNet):
        return (torch.randn(2, 3, 8, 8, generator=generator),), {}
    return (), dict(input_ids=torch.randint(2, 128, (2, 9), generator=generator))


def outputs(model, base):
    args, kwargs = inputs_for(base)
    with torch.no_grad():
        out = model(*args, **kwargs)
    return getattr(out, "logits", out)


def file_layout(folder):
    return {key: tuple(t.shape) for key, t in read_tensors(folder).items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, fields, (layer, names) = CASES[case]
    base = build()
    ours = randomize_trainable(peftkit.get_peft_model(copy.deepcopy(base), LoKrConfig(**fields)), scale=0.3)
    expected = outputs(ours, base)
    assert not torch.allclose(expected, outputs(base, base), atol=1e-3)  # the adapter acts
    ours.save_pretrained(tmp_path / "ours")
    held = {key.rsplit(".", 1)[1] for key in file_layout(tmp_path / "ours") if f".{layer}." in key}
    assert held == names

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(outputs(theirs, base), expected, **TOL)
    # and PEFT, making the same config from scratch, lays out the very same tensors
    fresh = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**fields))
    fresh.save_pretrained(tmp_path / "peft")
    assert file_layout(tmp_path / "peft") == file_layout(tmp_path / "ours")


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, fields, _ = CASES[case]
    base = build()
    theirs = randomize_trainable(
        peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**fields)), scale=0.3
    )
    expected = outputs(theirs, base)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(ours, base), expected, **TOL)
    # merged here, it still gives PEFT's outputs
    merged = ours.merge_and_unload()
    torch.testing.assert_close(outputs(merged, base), expected, **TOL)


def test_training_dropout_draws_what_peft_draws(tmp_path):
    """rank_dropout, rank_dropout_scale and module_dropout: a seeded training pass matches PEFT's."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    fields = dict(
        r=2, rank_dropout=0.5, rank_dropout_scale=True, module_dropout=0.3, target_modules=["0", "2", "4"]
    )
    ours = randomize_trainable(peftkit.get_peft_model(copy.deepcopy(base), LoKrConfig(**fields)), scale=0.3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours.train(), theirs.train()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours.eval()
        clean = ours(x)
        ours.train()
        for step in range(8):
            torch.manual_seed(step)
            dropped = ours(x)
            torch.manual_seed(step)
            torch.testing.assert_close(dropped, theirs(x), **TOL)
            assert not torch.allclose(dropped, clean)  # dropout did something in this pass


def test_saved_config_has_peft_fields_and_type(tmp_path):
    model = peftkit.get_peft_model(llama(), LoKrConfig(r=4, decompose_both=True, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= set(peft.LoKrConfig().to_dict())
    assert config["peft_type"] == "LOKR" and config["decompose_both"] is True and config["r"] == 4
    keys = file_layout(tmp_path)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lokr_w1" in keys
    assert not any(".default" in key or "base_layer" in key for key in keys)
