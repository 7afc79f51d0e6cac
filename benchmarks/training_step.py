"""A training step (forward and backward) of LoRA and DoRA on the reference model, against the floor and PEFT.

The floor is the base model's forward and backward with gradients to the input embeddings and no
trainable weight: the least work any adapter's training step does. The optimizer step is left out of
every contender: it is the same for peftkit and PEFT (the same parameters), and the floor has none.
Also: the bytes autograd keeps for backward with LoRA dropout 0.1 (the model's parameters not counted).
"""

from __future__ import annotations

from collections.abc import Callable

import peft
import peftkit
import torch

from benchmarks.common import LORA_TARGETS, interleaved, reference_batch, reference_model, saved_tensor_bytes


def floor_step(model, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    embed = model.get_input_embeddings()

    def forward() -> torch.Tensor:
        inputs = embed(ids).detach().requires_grad_(True)
        return model(inputs_embeds=inputs, labels=ids).loss

    return forward


def adapter_step(model, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    return forward


def with_backward(forward: Callable[[], torch.Tensor], model) -> Callable[[], None]:
    parameters = [param for param in model.parameters() if param.requires_grad]

    def step() -> None:
        for param in parameters:
            param.grad = None
        forward().backward()

    return step


def with_sibling_groups(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``forward`` with q/k/v's and gate/up's down-projections computed as one product each
    (``LoraLayer.group_siblings``, off by default)."""
    from peftkit_lora.layer import LoraLayer

    def grouped() -> torch.Tensor:
        before, LoraLayer.group_siblings = LoraLayer.group_siblings, True
        try:
            return forward()
        finally:
            LoraLayer.group_siblings = before

    return grouped


def lora_kwargs(dropout: float, use_dora: bool = False) -> dict:
    return dict(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=dropout, use_dora=use_dora)


def peftkit_model(device: str, dropout: float, use_dora: bool = False):
    model = peftkit.get_peft_model(reference_model(device), peftkit.LoraConfig(**lora_kwargs(dropout, use_dora)))
    return model.train()


def peft_model(device: str, dropout: float, use_dora: bool = False):
    model = peft.get_peft_model(reference_model(device), peft.LoraConfig(**lora_kwargs(dropout, use_dora)))
    return model.train()


def run(device: str, rounds: int) -> list[dict]:
    ids = reference_batch(device)
    base = reference_model(device).train()
    models = {
        "floor": base,
        "peftkit LoRA": peftkit_model(device, 0.0),
        "peftkit LoRA, grouped": peftkit_model(device, 0.0),
        "PEFT LoRA": peft_model(device, 0.0),
        "peftkit DoRA": peftkit_model(device, 0.0, use_dora=True),
        "PEFT DoRA": peft_model(device, 0.0, use_dora=True),
    }
    forwards = {
        name: (floor_step if name == "floor" else adapter_step)(model, ids) for name, model in models.items()
    }
    forwards["peftkit LoRA, grouped"] = with_sibling_groups(forwards["peftkit LoRA, grouped"])
    timing = interleaved({name: with_backward(forwards[name], models[name]) for name in models}, device, rounds)
    rows = [
        _row("LoRA training step, dropout 0", "peftkit LoRA", "floor", timing, 1.08, "floor"),
        _row("LoRA training step, dropout 0", "peftkit LoRA", "PEFT LoRA", timing, 0.92, "PEFT"),
        _row("PEFT's LoRA training step, dropout 0", "PEFT LoRA", "floor", timing, None, "floor"),
        _row(
            "LoRA training step, dropout 0, sibling down-projections grouped (opt-in)",
            "peftkit LoRA, grouped",
            "peftkit LoRA",
            timing,
            None,
            "per layer",
        ),
        _row("DoRA training step", "peftkit DoRA", "peftkit LoRA", timing, 1.3, "peftkit LoRA"),
        _row("PEFT's DoRA training step", "PEFT DoRA", "PEFT LoRA", timing, None, "PEFT LoRA"),
    ]
    del models, forwards

    dropout_models = {"peftkit": peftkit_model(device, 0.1), "PEFT": peft_model(device, 0.1)}
    saved = {name: saved_tensor_bytes(adapter_step(model, ids), model) for name, model in dropout_models.items()}
    saved["floor"] = saved_tensor_bytes(floor_step(base, ids), base)
    mib = {name: (total / 2**20, activations / 2**20) for name, (total, activations) in saved.items()}
    rows.append(
        {
            "what": "bytes autograd keeps for backward, LoRA dropout 0.1",
            "figure": saved["peftkit"][0] / saved["PEFT"][0],
            "against": "PEFT",
            "goal": 0.85,
            "detail": "; ".join(
                f"{name} {total:.1f} MiB ({activations:.1f} MiB besides weights)"
                for name, (total, activations) in mib.items()
            ),
        }
    )
    return rows


def _row(what: str, name: str, baseline: str, timing, goal: float | None, against: str) -> dict:
    return {
        "what": what,
        "figure": timing.ratio(name, baseline),
        "against": against,
        "goal": goal,
        "detail": f"{name} {timing.median(name) * 1e3:.1f} ms, {baseline} {timing.median(baseline) * 1e3:.1f} ms",
    }
