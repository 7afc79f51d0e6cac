"""QLoRA end to end: LoRA and DoRA on 4-bit (nf4, fp4, with and without double quantization) and 8-bit bases."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peftkit import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

QUANTIZED_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def lora_config(use_dora: bool) -> LoraConfig:
    return LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, task_type="CAUSAL_LM"
    )


def train(model, tokens, steps: int = 8, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_on_a_quantized_base_trains_saves_and_reloads(
    load_quantized, tokens, tmp_path, kind, use_dora, device
):
    tokens = tokens.to(device)
    base = prepare_model_for_kbit_training(
        load_quantized(kind, device), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    model = get_peft_model(base, lora_config(use_dora))
    wrapped = [layer.get_base_layer() for _, layer in model.adapter_layers()]
    assert wrapped and all(isinstance(layer, QUANTIZED_TYPES) for layer in wrapped)

    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.grad is not None for p in trainable.values())
    # B starts at zero, so only B (and DoRA's magnitude) get a non-zero gradient on the first step
    moving = [p for name, p in trainable.items() if "lora_B" in name or "magnitude" in name]
    assert moving and all(p.grad.abs().sum() > 0 for p in moving)
    model.zero_grad()

    losses = train(model, tokens)
    assert losses[-1] < 0.9 * losses[0]

    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_quantized(kind, device), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, expected, rtol=0, atol=0)
