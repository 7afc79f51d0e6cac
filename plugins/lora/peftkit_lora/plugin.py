"""LoRA's hook implementations: register, inject into targeted layers, train and save biases as asked."""

from __future__ import annotations

import re

import torch
from peftkit import MethodSpec, hookimpl, inject_into_targets, method_impl
from peftkit.injection import fill_default_targets
from peftkit.serialization import check_shape

from peftkit_lora.config import LoraConfig
from peftkit_lora.layer import LoraLayer
from peftkit_lora.weighted_adapter import add_weighted_adapter

# PEFT's default targets when target_modules is None, by transformers model_type.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [MethodSpec(name="lora", config_class=LoraConfig, peft_type="LORA", family="weight-delta")]


@hookimpl
def peftkit_model_methods():
    return {"add_weighted_adapter": add_weighted_adapter}


@method_impl("lora")
def peftkit_inject_adapter(peft_model, config: LoraConfig, adapter_name: str) -> bool:
    fill_default_targets(peft_model, config, DEFAULT_TARGETS)
    inject_into_targets(peft_model, config, adapter_name, LoraLayer)
    return True


def _trained_biases(peft_model, config: LoraConfig, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The biases LoRA trains: none, all of the model's, or those of the layers this adapter adapts."""
    if config.bias == "none":
        return {}
    model = peft_model.base_model.model
    # adapter tensors (another adapter's trained copy of a modules_to_save head) belong to their adapter
    owned = {
        id(p)
        for _, layer in peft_model.adapter_layers()
        for name in peft_model.peft_config
        for _, p in layer.adapter_parameters(name)
    }
    biases = {
        name: p
        for name, p in model.named_parameters()
        if name.endswith("bias") and ".lora_" not in name and id(p) not in owned
    }
    if config.bias == "lora_only":
        wrapped = [
            path + ".base_layer."
            for path, module in model.named_modules()
            if isinstance(module, LoraLayer) and module.holds(adapter_name)
        ]
        biases = {name: p for name, p in biases.items() if any(name.startswith(prefix) for prefix in wrapped)}
    return biases


@method_impl("lora")
def peftkit_trainable_parameters(peft_model, config: LoraConfig, adapter_name: str):
    return list(_trained_biases(peft_model, config, adapter_name).items())


@method_impl("lora")
def peftkit_adapter_state_dict(peft_model, config: LoraConfig, adapter_name: str):
    return {
        f"base_model.model.{name}": p for name, p in _trained_biases(peft_model, config, adapter_name).items()
    }


def _unwrapped(name: str) -> str:
    """A parameter name without adapter layers' ``.base_layer``: the same whichever adapters wrap the layer."""
    return re.sub(r"\.base_layer(?=\.)", "", name)


@method_impl("lora")
def peftkit_load_adapter_state_dict(peft_model, config: LoraConfig, adapter_name: str, state_dict):
    # a bias is saved under its name at save time, which has ".base_layer" when any adapter wrapped its layer
    biases = {
        _unwrapped(name): param for name, param in _trained_biases(peft_model, config, adapter_name).items()
    }
    taken = []
    for key, value in state_dict.items():
        name = _unwrapped(key.removeprefix("base_model.model."))
        if name not in biases:
            continue
        check_shape(key, value, biases[name])
        with torch.no_grad():
            biases[name].copy_(value)
        taken.append(key)
    return taken
