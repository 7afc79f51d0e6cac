"""PEFT's ``bias`` option as a method plugin's three hook implementations, written once.

Methods of the LoRA family take ``bias="none"``, ``"all"`` or ``"<method>_only"`` (LoRA's ``"lora_only"``,
OFT's ``"oft_only"``): which base-model biases train beside the adapter and are saved and loaded with it
(:mod:`peftkit.biases`). A plugin assigns what :func:`bias_hooks` returns to the hooks' names::

    peftkit_trainable_parameters, peftkit_adapter_state_dict, peftkit_load_adapter_state_dict = bias_hooks(
        "oft", "peftkit_oft.layer:OFTLayer", only="oft_only"
    )

The layer class is named, not passed, so that loading the plugin stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from peftkit.method import method_impl


def bias_hooks(method: str, layer_class: str, only: str = "lora_only") -> tuple[Callable, Callable, Callable]:
    """``peftkit_trainable_parameters``, ``peftkit_adapter_state_dict`` and ``peftkit_load_adapter_state_dict``
    for ``method``, whose adapters live in ``layer_class`` (``"module:Class"``) and whose ``bias`` option
    names the adapted layers' biases ``only``."""
    module_name, _, class_name = layer_class.partition(":")

    def layer() -> type:
        return getattr(importlib.import_module(module_name), class_name)

    def rule(config: Any) -> Any:
        # peftkit.biases speaks LoRA's names
        return SimpleNamespace(bias="lora_only" if config.bias == only else config.bias)

    @method_impl(method)
    def peftkit_trainable_parameters(peft_model, config, adapter_name: str):
        from peftkit import biases  # here, not at the top: it imports torch

        return list(biases.trained_biases(peft_model, rule(config), adapter_name, layer()).items())

    @method_impl(method)
    def peftkit_adapter_state_dict(peft_model, config, adapter_name: str):
        from peftkit import biases

        return biases.bias_state_dict(peft_model, rule(config), adapter_name, layer())

    @method_impl(method)
    def peftkit_load_adapter_state_dict(peft_model, config, adapter_name: str, state_dict):
        from peftkit import biases

        return biases.load_biases(peft_model, rule(config), adapter_name, layer(), state_dict)

    return peftkit_trainable_parameters, peftkit_adapter_state_dict, peftkit_load_adapter_state_dict
