"""LoHa adapters move between peftkit and PEFT with the same outputs, both ways, on Linear and conv layers."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_llama, tiny_plain
from peftkit_loha import LoHaConfig
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)


class TinyConvNet(nn.Module):
    """Conv2d layers of every shape LoHa treats differently: a 3 × 3 kernel, a strided grouped one, a 1 × 1
    one (no effective decomposition there), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(8, 12, kernel_size=(3, 2), stride=2, padding=1, groups=2)
        self.pointwise = nn.Conv2d(12, 12, kernel_size=1)
        self.head = nn.Linear(12, 5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(pixel_values))
        h = torch.relu(self.grouped(h))
        h = self.pointwise(h) + h
        return self.head(h.mean(dim=(2, 3)))


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


CONV_TARGETS = ["stem", "grouped", "pointwise", "head"]

CASES = {
    "llama": (tiny_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "llama-patterns": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
            task_type="CAUSAL_LM",
        ),
    ),
    # rank 2 on the stem: its forward runs through the rank-r² factors, the other layers form ΔW
    "conv2d": (tiny_convnet, dict(target_modules=CONV_TARGETS, rank_pattern={"stem": 2})),
    "conv2d-effective": (
        tiny_convnet,
        dict(target_modules=CONV_TARGETS, use_effective_conv2d=True, rank_pattern={"grouped": 3, "stem": 2}),
    ),
    "conv1d-effective": (tiny_plain, dict(target_modules=["conv", "fc1"], use_effective_conv2d=True)),
}


def inputs(case: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if case.startswith("conv2d"):
        return dict(pixel_values=torch.randn(2, 3, 9, 8, generator=generator))
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    if case.startswith("conv1d"):
        return dict(input_ids=ids)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return dict(input_ids=ids, attention_mask=mask)


def outputs(model, case: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(case))
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(peftkit.get_peft_model(base, LoHaConfig(r=4, alpha=8, **kwargs)), scale=0.3)
    expected = outputs(ours, case)
    with torch.no_grad():
        assert (expected - outputs(pristine, case)).abs().max() > 1e-3  # the adapter acts
    if case.startswith("conv2d"):  # both forward paths are compared with PEFT's
        assert {layer.forms_delta("default") for _, layer in ours.adapter_layers()} == {True, False}
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(outputs(theirs, case), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = randomize_trainable(
        peft.get_peft_model(base, peft.LoHaConfig(r=4, alpha=8, **kwargs)), scale=0.3
    )
    expected = outputs(theirs, case)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(outputs(ours, case), expected, **TOL)
    # and merged here, the same outputs within float32 rounding of their scale
    merged = ours.merge_and_unload()
    torch.testing.assert_close(outputs(merged, case), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensor_names_and_shapes_as_peft(case):
    build, kwargs = CASES[case]
    ours = peftkit.get_peft_model(build(), LoHaConfig(r=4, **kwargs))
    theirs = peft.get_peft_model(build(), peft.LoHaConfig(r=4, **kwargs))
    ours_shapes = {key: tuple(t.shape) for key, t in _saved(ours).items()}
    theirs_shapes = {key: tuple(t.shape) for key, t in peft.get_peft_model_state_dict(theirs).items()}
    assert ours_shapes == theirs_shapes


def _saved(model) -> dict[str, torch.Tensor]:
    from peftkit import serialization

    return serialization.adapter_state_dict(model, "default")


@pytest.mark.parametrize("init_weights", [True, False])
def test_init_gives_peft_tensors_under_one_seed(init_weights):
    """Kaiming-uniform (a = √5) drawn in PEFT's order, W2b zero for the identity init."""
    kwargs = dict(r=4, target_modules=CONV_TARGETS, use_effective_conv2d=True, init_weights=init_weights)
    model = tiny_convnet()
    torch.manual_seed(5)
    ours = _saved(peftkit.get_peft_model(copy.deepcopy(model), LoHaConfig(**kwargs)))
    torch.manual_seed(5)
    theirs = peft.get_peft_model_state_dict(
        peft.get_peft_model(copy.deepcopy(model), peft.LoHaConfig(**kwargs))
    )
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key
    zero = {key for key, tensor in ours.items() if not tensor.any()}
    assert zero == ({key for key in ours if key.endswith("hada_w2_b")} if init_weights else set())


def test_training_with_rank_and_module_dropout_matches_peft_under_one_seed():
    kwargs = dict(r=4, alpha=8, target_modules=["fc1", "fc2", "conv"], rank_dropout=0.5, module_dropout=0.3)
    base = tiny_plain()
    ours = randomize_trainable(peftkit.get_peft_model(copy.deepcopy(base), LoHaConfig(**kwargs)), scale=0.3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**kwargs))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    theirs_state = peft.get_peft_model_state_dict(theirs)
    assert all(torch.equal(theirs_state[key], t) for key, t in _saved(ours).items())
    ours.train()
    theirs.train()
    ids = inputs("conv1d")["input_ids"]
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        ours_out = ours(input_ids=ids)
        torch.manual_seed(seed)
        theirs_out = theirs(input_ids=ids)
        torch.testing.assert_close(ours_out, theirs_out, **TOL)
        seen.add(round(ours_out.sum().item(), 4))
    assert len(seen) > 1  # dropout acted: the seeds gave different outputs
    ours.eval()
    torch.testing.assert_close(outputs(ours, "conv1d"), outputs(theirs.eval(), "conv1d"), **TOL)


def test_saved_config_has_peft_fields(tmp_path):
    model = peftkit.get_peft_model(
        tiny_llama(), LoHaConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= set(peft.LoHaConfig().to_dict())
    assert config["peft_type"] == "LOHA" and config["rank_pattern"] == {"q_proj": 2}
    assert config["inference_mode"] is True
    loaded = peft.LoHaConfig.from_pretrained(tmp_path)
    assert loaded.r == 4 and loaded.alpha == 8 and loaded.target_modules == {"q_proj"}
