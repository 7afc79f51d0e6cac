"""Adapters on quantized bases move between peftkit and PEFT (with PEFT's own bitsandbytes layers) both ways.

Measured with fp32 compute on the CPU (tiny Llama, hidden 64, all linear layers adapted): LoRA outputs
agree exactly (max |diff| 0) on nf4, fp4 (each with and without double quantization) and int8, both ways;
DoRA within 5.5e-7 at an output scale of 0.6 (1e-6 relative: the norm of W + ΔW is summed in another
order). The tests allow 1e-5 relative to the output scale. ``PEFTKIT_BNB_REPORT=1 pytest -s`` prints them.
"""

from __future__ import annotations

import os

import peft
import pytest
import torch
from peftkit import LoraConfig, PeftModel, get_peft_model

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


def assert_same_outputs(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().item()
    if os.environ.get("PEFTKIT_BNB_REPORT"):
        print(f"max |diff| {(ours - theirs).abs().max().item():.3g} at output scale {scale:.3g}")
    assert (ours - theirs).abs().max().item() <= RTOL * scale


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peftkit_adapter_loads_in_peft(load_quantized, tokens, tmp_path, kind, use_dora):
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, task_type="CAUSAL_LM"
    )
    ours = randomized(get_peft_model(load_quantized(kind), config))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized(kind), tmp_path)
    with torch.no_grad():
        base = load_quantized(kind)(input_ids=tokens).logits
        expected = ours(input_ids=tokens).logits
        assert (expected - base).abs().max() > 1e-2  # the adapter does change outputs
        assert_same_outputs(expected, theirs(input_ids=tokens).logits)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_in_peftkit(load_quantized, tokens, tmp_path, kind, use_dora):
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, task_type="CAUSAL_LM"
    )
    theirs = randomized(peft.get_peft_model(load_quantized(kind), config))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(load_quantized(kind), tmp_path)
    with torch.no_grad():
        assert_same_outputs(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits)


def test_trained_qlora_adapter_reproduces_in_peft(load_quantized, tokens, tmp_path):
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
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized("nf4"), tmp_path)
    with torch.no_grad():
        assert_same_outputs(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits)
