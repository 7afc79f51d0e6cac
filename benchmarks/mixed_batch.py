"""One decoding step of 64 sequences whose rows use 32 different LoRA adapters, against one adapter for all.

Each sequence decodes one token (a batch of 64 × 1 token ids, no KV cache). The baseline is the same
batch through the same model with one adapter active; the mixed batch names an adapter per row
(``adapter_names=``, PEFT's API), two rows per adapter. Both libraries run both cases.
"""

from __future__ import annotations

import peft
import peftkit
import torch

from benchmarks.common import LORA_TARGETS, interleaved, reference_model

ADAPTERS, ROWS = 32, 64


def _randomized(model, names: list[str]) -> None:
    """Give every adapter its own non-zero B (a fresh LoRA adapter has B = 0 and would add nothing)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def peftkit_model(device: str):
    config = peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    model = peftkit.get_peft_model(reference_model(device), config, adapter_name="a0")
    for index in range(1, ADAPTERS):
        model.add_adapter(f"a{index}", config)
    return model.eval()


def peft_model(device: str):
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(reference_model(device), config, adapter_name="a0")
    for index in range(1, ADAPTERS):
        model.add_adapter(f"a{index}", config)
    return model.eval()


def run(device: str, rounds: int) -> list[dict]:
    ids = torch.randint(0, 4000, (ROWS, 1), generator=torch.Generator().manual_seed(2)).to(device)
    names = [f"a{row % ADAPTERS}" for row in range(ROWS)]
    models = {"peftkit": peftkit_model(device), "PEFT": peft_model(device)}
    for model in models.values():
        _randomized(model, names)

    def single(model):
        return lambda: model(input_ids=ids)

    def mixed(model):
        return lambda: model(input_ids=ids, adapter_names=names)

    contenders = {}
    for library, model in models.items():
        contenders[f"{library} one adapter"] = single(model)
        contenders[f"{library} 32 adapters"] = mixed(model)
    with torch.no_grad():
        timing = interleaved(contenders, device, rounds)

    def row(what, name, baseline, goal, against):
        return {
            "what": what,
            "figure": timing.ratio(name, baseline),
            "against": against,
            "goal": goal,
            "detail": f"{name} {timing.median(name) * 1e3:.1f} ms, {baseline} {timing.median(baseline) * 1e3:.1f} ms",
        }

    return [
        row("mixed batch: 64 rows, 32 adapters", "peftkit 32 adapters", "peftkit one adapter", 1.25, "one adapter"),
        row("PEFT's mixed batch: 64 rows, 32 adapters", "PEFT 32 adapters", "PEFT one adapter", None, "one adapter"),
        row("mixed batch: 64 rows, 32 adapters", "peftkit 32 adapters", "PEFT 32 adapters", None, "PEFT"),
    ]
