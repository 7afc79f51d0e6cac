"""LoRA for peftkit: W x + (alpha / r) · B A x, with A: in → r and B: r → out, B zero at init."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_lora.config import CordaConfig, EvaConfig, LoftQConfig, LoraConfig

if TYPE_CHECKING:
    from peftkit_lora.layer import LoraLayer

__version__ = "0.7.1"
__all__ = [
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraLayer",
    "__version__",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {
    "LoraLayer": "peftkit_lora.layer",
    "get_eva_state_dict": "peftkit_lora.eva_init",
    "initialize_lora_eva_weights": "peftkit_lora.eva_init",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_lora' has no attribute {name!r}")
