"""PEFT's ``bias`` field of the LoRA family: the base model's biases that train, save and load with an adapter.

``"none"``: none. ``"all"``: every bias of the base model. ``"lora_only"``: the biases of the layers the
adapter adapts. They are the base model's own parameters, so, as in PEFT, they change its output even
with the adapter disabled. Saved under ``base_model.model.<path>``, the path the base model had before
any adapter wrapped the layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.injection import logical_path
from peftkit.serialization import copy_checked

KEY_ROOT = "base_model.model."


def trained_biases(
    peft_model: Any, config: Any, adapter_name: str, layer_class: type[nn.Module]
) -> dict[str, nn.Parameter]:
    """The biases ``config.bias`` trains, by parameter name in the base model (as it is now)."""
    if config.bias == "none":
        return {}
    # adapter tensors (another adapter's trained copy of a modules_to_save head) belong to their adapter
    owned = {
        id(param)
        for _, layer in peft_model.adapter_layers()
        for name in peft_model.peft_config
        for _, param in layer.adapter_parameters(name)
    }
    biases = {
        name: param
        for name, param in peft_model.base_model.model.named_parameters()
        if name.endswith("bias") and id(param) not in owned
    }
    if config.bias == "lora_only":
        wrapped = [
            path + ".base_layer."
            for path, layer in peft_model.adapter_layers()
            if isinstance(layer, layer_class) and layer.holds(adapter_name)
        ]
        biases = {name: p for name, p in biases.items() if any(name.startswith(prefix) for prefix in wrapped)}
    return biases


def bias_state_dict(peft_model: Any, config: Any, adapter_name: str, layer_class: type[nn.Module]) -> dict:
    return {
        KEY_ROOT + name: param
        for name, param in trained_biases(peft_model, config, adapter_name, layer_class).items()
    }


def load_biases(
    peft_model: Any,
    config: Any,
    adapter_name: str,
    layer_class: type[nn.Module],
    state_dict: dict[str, torch.Tensor],
) -> list[str]:
    """Copy saved biases into the trained ones; the keys taken."""
    # saved under the name it had at save time, with ".base_layer" where an adapter wrapped the layer then
    biases = {
        logical_path(name): param
        for name, param in trained_biases(peft_model, config, adapter_name, layer_class).items()
    }
    taken = []
    for key, value in state_dict.items():
        name = logical_path(key.removeprefix(KEY_ROOT))
        if name in biases:
            copy_checked(key, value, biases[name])
            taken.append(key)
    return taken
