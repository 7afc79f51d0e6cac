"""Unmerging restores the base weight bit for bit, keeping one byte per weight element while merged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import LoraConfig, exact_unmerge, get_peft_model
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {2: torch.int16, 4: torch.int32}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(BITS[tensor.element_size()])


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    numel=st.integers(1, 65),
    seed=st.integers(0, 2**31),
    spread=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_restore_gives_back_any_original_from_any_approximation(dtype, numel, seed, spread):
    """Whatever unmerging computes, near or far (different signs, inf, NaN), the residual makes it exact."""
    generator = torch.Generator().manual_seed(seed)
    original = torch.randn(numel, generator=generator).to(dtype)
    noise = torch.randn(numel, generator=generator) * spread * original.float().abs()
    approx = (original.float() + noise).to(dtype)
    approx[: numel // 8] = torch.tensor(float("nan"))  # some far off entirely
    kept = exact_unmerge.residual(original, approx, version=0)
    assert torch.equal(bits(exact_unmerge.restore(approx, kept)), bits(original))


def lora_linear(dtype: torch.dtype, seed: int, delta_scale: float = 1.0) -> nn.Module:
    """A LoRA'd linear layer whose delta is random (init_lora_weights=False: about the weight's own size),
    or with ``delta_scale`` < 1 the size of a trained adapter's delta, a few percent of the weight."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 40)).to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.get_base_model()[0].lora_B["default"].weight.mul_(delta_scale)
    return peft_model


@settings(max_examples=20, deadline=None)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31), cycles=st.integers(1, 4))
@pytest.mark.parametrize("delta_scale", [1.0, 0.05])
def test_merge_unmerge_cycles_restore_the_weight_bit_for_bit(dtype, seed, cycles, delta_scale):
    model = lora_linear(dtype, seed, delta_scale)
    base = model.get_base_model()[0].get_base_layer()
    before = base.weight.detach().clone()
    for _ in range(cycles):
        model.merge_adapter()
        model.unmerge_adapter()
    assert torch.equal(bits(base.weight.detach()), bits(before))


def test_plain_arithmetic_would_drift_in_bf16_so_the_residual_is_doing_the_work():
    """The reason for the residual: without it, one bf16 cycle already moves weights."""
    model = lora_linear(torch.bfloat16, seed=0, delta_scale=0.05)
    layer = model.get_base_model()[0]
    weight = layer.get_base_layer().weight.detach().clone()
    drifted = layer.unmerged_weight("default", layer.merged_weight("default", weight))
    assert not torch.equal(drifted, weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_residual_takes_at_most_one_byte_per_weight_element(dtype):
    model = lora_linear(dtype, seed=1, delta_scale=0.05)
    layer = model.get_base_model()[0]
    numel = layer.get_base_layer().weight.numel()
    model.merge_adapter()
    kept = layer.merge_residuals["default"]
    assert kept.steps.dtype == torch.uint8 and kept.steps.numel() == (numel + 1) // 2  # two steps a byte
    far = kept.far_index.numel()
    assert far < numel // 20  # a trained delta rarely moves an element more than 7 representable values
    assert kept.nbytes == (numel + 1) // 2 + far * (4 + kept.far_bits.element_size()) <= numel
    model.unmerge_adapter()
    assert layer.merge_residuals == {}


def test_two_adapters_merged_and_unmerged_in_turn_restore_exactly():
    model = lora_linear(torch.bfloat16, seed=2)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.set_adapter(["default", "other"])
    base = model.get_base_model()[0].get_base_layer()
    before = base.weight.detach().clone()
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(bits(base.weight.detach()), bits(before))


def test_a_weight_changed_while_merged_is_unmerged_by_plain_arithmetic():
    """The residual describes the merged weight it was made for; after an optimizer step it would be wrong."""
    model = lora_linear(torch.float32, seed=3)
    base = model.get_base_model()[0].get_base_layer()
    model.merge_adapter()
    with torch.no_grad():
        base.weight.add_(1.0)
    expected = model.get_base_model()[0].unmerged_weight("default", base.weight.detach().clone())
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight.detach(), expected, rtol=0, atol=0)
