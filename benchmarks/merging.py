"""Merging: whether three merge → unmerge cycles on a bf16 base give the weights back, what that costs in
memory while merged, and whether a merged model infers at the base model's speed.

Exactness: the reference model in bf16 with a LoRA adapter whose B is random (a fresh one has B = 0 and
merges nothing); after three cycles, the count of base weight elements that differ in any bit from
before. Memory: the bytes peftkit keeps while merged to unmerge exactly, per merged weight element.
Speed: a no-grad forward of 2 × 128 tokens through the merged PeftModel against the bare base model
with the same (merged) weights, and PEFT's merged model, interleaved.
"""

from __future__ import annotations

import copy

import peft
import peftkit
import torch

from benchmarks.common import LORA_TARGETS, interleaved, reference_batch, reference_model


def _randomize_b(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if not param.requires_grad and "lora_" not in name and param.dim() == 2
    }


def _changed_elements(model, before: dict[str, torch.Tensor]) -> tuple[int, int]:
    params = dict(model.named_parameters())
    changed = sum(
        int((params[name].detach().view(torch.int16) != value.view(torch.int16)).sum())
        for name, value in before.items()
    )
    return changed, sum(value.numel() for value in before.values())


def exactness(device: str) -> list[dict]:
    config = dict(r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    models = {
        "peftkit": peftkit.get_peft_model(reference_model(device, torch.bfloat16), peftkit.LoraConfig(**config)),
        "PEFT": peft.get_peft_model(reference_model(device, torch.bfloat16), peft.LoraConfig(**config)),
    }
    results = {}
    for name, model in models.items():
        _randomize_b(model)
        before = _base_weights(model)
        for _ in range(3):
            model.merge_adapter()
            if name == "peftkit":
                kept = sum(kept.nbytes for _, layer in model.adapter_layers() for kept in layer.merge_residuals.values())
                merged_elements = sum(layer.get_base_layer().weight.numel() for _, layer in model.adapter_layers())
            model.unmerge_adapter()
        results[name] = _changed_elements(model, before)
    (kit_changed, total), (peft_changed, _) = results["peftkit"], results["PEFT"]
    return [
        {
            "what": "merge → unmerge ×3, bf16: base weight elements not restored bit for bit",
            "figure": kit_changed,
            "against": "count",
            "goal": 0,
            "detail": f"peftkit {kit_changed:,} of {total:,}; PEFT {peft_changed:,} ({100 * peft_changed / total:.1f}%)",
        },
        {
            "what": "extra bytes per merged weight element while merged",
            "figure": kept / merged_elements,
            "against": "bytes",
            "goal": 1.0,
            "detail": f"{kept:,} bytes for {merged_elements:,} merged elements",
        },
    ]


def merged_speed(device: str, rounds: int) -> list[dict]:
    ids = reference_batch(device)
    config = dict(r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    kit = peftkit.get_peft_model(reference_model(device), peftkit.LoraConfig(**config)).eval()
    reference = peft.get_peft_model(reference_model(device), peft.LoraConfig(**config)).eval()
    _randomize_b(kit)
    _randomize_b(reference)
    kit.merge_adapter()
    reference.merge_adapter()
    base = copy.deepcopy(kit).merge_and_unload()  # a plain transformers model, the same merged weights
    with torch.no_grad():
        timing = interleaved(
            {
                "base": lambda: base(input_ids=ids),
                "peftkit merged": lambda: kit(input_ids=ids),
                "PEFT merged": lambda: reference(input_ids=ids),
            },
            device,
            rounds,
        )
    return [
        {
            "what": "merged model inference",
            "figure": timing.ratio("peftkit merged", "base"),
            "against": "base model",
            "goal": 1.0,
            "detail": f"peftkit merged {timing.median('peftkit merged') * 1e3:.1f} ms, base {timing.median('base') * 1e3:.1f} ms, "
            f"PEFT merged {timing.median('PEFT merged') * 1e3:.1f} ms",
        }
    ]
