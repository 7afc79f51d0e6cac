"""Shared pieces of the AdaLoRA tests: inputs, logits, randomized adapters and a short training loop."""

from __future__ import annotations

import torch


def batch(seed: int = 1, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return dict(input_ids=ids, attention_mask=mask)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch()).logits


def randomize_adalora(model, seed: int = 3, vector_std: float = 0.3) -> None:
    """Random singular values (std 1) and singular vectors (std ``vector_std``), by PEFT's tensor names,
    so the adapter moves the outputs clearly (in PEFT's and in peftkit's models alike)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            std = 1.0 if "lora_E" in name else vector_std
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def train(model, steps: int, lr: float = 1e-2, on_step=None) -> None:
    """PEFT's documented AdaLoRA loop: backward, optimizer.step(), update_and_allocate(step), zero_grad()."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        inputs = batch(seed=step % 3)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        if on_step is not None:
            on_step(step)
        optimizer.zero_grad()
    model.eval()
