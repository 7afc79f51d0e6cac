"""``get_peft_model`` with LoRA r=16 on all linear layers of a Llama-2-7B-shaped model on the meta device.

The model is laid out on the meta device (no weights: what ``peftkit plan`` does); each round builds a
fresh one for each contender outside the timed part, then times the wrapping alone.
"""

from __future__ import annotations

import peft
import peftkit
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import interleaved

LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)


def meta_llama_7b() -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_2_7B))


def run(device: str, rounds: int) -> list[dict]:
    wraps = {
        "peftkit": lambda m: peftkit.get_peft_model(m, peftkit.LoraConfig(r=16, target_modules="all-linear")),
        "PEFT": lambda m: peft.get_peft_model(m, peft.LoraConfig(r=16, target_modules="all-linear")),
    }
    prepared: dict[str, LlamaForCausalLM] = {}
    trainable: dict[str, int] = {}

    def prepare(name):
        return lambda: prepared.__setitem__(name, meta_llama_7b())

    def wrap(name):
        def call():
            trainable[name] = wraps[name](prepared.pop(name)).get_nb_trainable_parameters()[0]

        return call

    timing = interleaved(
        {name: wrap(name) for name in wraps}, "cpu", rounds, warmup=1, setup={name: prepare(name) for name in wraps}
    )
    assert trainable["peftkit"] == trainable["PEFT"], trainable
    return [
        {
            "what": "get_peft_model, Llama-2-7B shape on the meta device, all-linear",
            "figure": timing.ratio("peftkit", "PEFT"),
            "against": "PEFT",
            "goal": 0.5,
            "detail": f"peftkit {timing.median('peftkit') * 1e3:.0f} ms, PEFT {timing.median('PEFT') * 1e3:.0f} ms; "
            f"{trainable['peftkit']:,} trainable parameters each",
        }
    ]
