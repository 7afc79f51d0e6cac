"""Every weight method trains on 4-bit and 8-bit bases, with no method knowing of bitsandbytes.

LoHa, LoKr, AdaLoRA and IA3 read and write base weights only through the layer hooks, so the backend is all
they need: each trains a few steps here, with gradients reaching its own tensors and the base left as it was.
"""

from __future__ import annotations

import pytest
import torch
from peftkit import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, get_peft_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=TARGETS),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=TARGETS),
    "adalora": lambda: AdaLoraConfig(init_r=6, target_r=4, total_step=20, target_modules=TARGETS),
    "ia3": lambda: IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
}


def base_state(model) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if not p.requires_grad and p.dtype in (torch.uint8, torch.int8)
    }


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_method_trains_on_a_quantized_base(load_quantized, tokens, method, kind):
    model = get_peft_model(load_quantized(kind), CONFIGS[method]())
    frozen = base_state(model)
    assert frozen  # the packed 4-bit codes or int8 rows
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for step in range(6):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if step == 0:
            assert all(p.grad is not None for p in trainable.values())
            assert any(p.grad.abs().sum() > 0 for p in trainable.values())
        optimizer.step()
        if method == "adalora":
            model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, before in frozen.items():
        assert torch.equal(model.get_parameter(name), before), name
