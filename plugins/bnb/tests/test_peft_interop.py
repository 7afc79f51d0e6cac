"""Adapters on quantized bases move between peftkit and PEFT (with PEFT's own bitsandbytes layers) both ways.

The two libraries are compared in train mode, before any inference forward, so no 4-bit layer is packed
(conftest.py) and both compute exactly. Measured with fp32 compute on the CPU (tiny Llama, hidden 64,
all linear layers adapted): LoRA outputs agree exactly (max |diff| 0) on nf4, fp4 (each with and
without double quantization) and int8, both ways; DoRA within 6.9e-7 at an output scale of 0.59 (1.2e-6
relative: the norm of W + ΔW is summed in another order). The tests allow 1e-5 relative to the output
scale. ``PEFTKIT_BNB_REPORT=1 pytest -s`` prints them.

On the packed layout PEFT 0.21's DoRA is wrong: it dequantizes the packed codes as if they were in the
standard layout, so its weight norms are those of a scrambled weight (measured 0.15-0.16 off at an
output scale of 0.59, 25-27 % of it), while peftkit reads the packed layout and stays within the packed
kernel's own rounding of the exact outputs (measured 0.6 %). A separate test shows both where the CPU
packs.
"""

from __future__ import annotations

import os

import peft
import pytest
import torch
from peftkit import LoraConfig, PeftModel, get_peft_model

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

RTOL = 1e-5


def randomized(model):
    """Give every adapter tensor random values, so the adapter changes outputs (B starts at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(
                    torch.randn(param.shape, generator=generator) * 0.1 + (1 if "magnitude" in name else 0)
                )
    return model


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = theirs.abs().max().item()
    if os.environ.get("PEFTKIT_BNB_REPORT"):
        print(f"max |diff| {(ours - theirs).abs().max().item():.3g} at output scale {scale:.3g}")
    return (ours - theirs).abs().max().item() / scale


def assert_same_outputs(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert relative_difference(ours, theirs) <= RTOL


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peftkit_adapter_loads_in_peft(load_quantized, exact_logits, tokens, tmp_path, kind, use_dora):
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, task_type="CAUSAL_LM"
    )
    ours = randomized(get_peft_model(load_quantized(kind), config))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized(kind), tmp_path)
    expected = exact_logits(ours, tokens)
    assert (expected - exact_logits(load_quantized(kind), tokens)).abs().max() > 1e-2  # the adapter counts
    assert_same_outputs(expected, exact_logits(theirs, tokens))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_in_peftkit(load_quantized, exact_logits, tokens, tmp_path, kind, use_dora):
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, task_type="CAUSAL_LM"
    )
    theirs = randomized(peft.get_peft_model(load_quantized(kind), config))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(load_quantized(kind), tmp_path)
    assert_same_outputs(exact_logits(ours, tokens), exact_logits(theirs, tokens))


def test_dora_on_the_packed_layout_is_right_in_peftkit_and_wrong_in_peft(
    packed_kernel, load_quantized, in_layout, exact_logits, tokens, tmp_path, four_bit_kind
):
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    ours = randomized(get_peft_model(load_quantized(four_bit_kind), config))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized(four_bit_kind), tmp_path)
    # the exact outputs of the packed model: its weights (codes with bf16 absmaxes) in the standard layout
    _, reference = in_layout(ours, "packed")
    exact = exact_logits(reference, tokens)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        ours_packed, theirs_packed = ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits
    assert relative_difference(ours_packed, exact) < packed_kernel  # the kernel's bf16 rounding
    assert relative_difference(theirs_packed, exact) > 2 * packed_kernel, (
        "PEFT's DoRA now reads the packed layout right: update docs/quantization.md and this test"
    )


def test_trained_qlora_adapter_reproduces_in_peft(load_quantized, exact_logits, tokens, tmp_path):
    from peftkit import prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(
        load_quantized("nf4"), gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    ours = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    losses = []
    for _ in range(6):
        loss = ours(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized("nf4"), tmp_path)
    assert_same_outputs(exact_logits(ours, tokens), exact_logits(theirs, tokens))
