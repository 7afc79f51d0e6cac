"""AdaLoRA for peftkit: W x + (lora_alpha / init_r) · P Λ Q x, its ranks pruned by importance in training."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_adalora.config import AdaLoraConfig

if TYPE_CHECKING:
    from peftkit_adalora.callback import AdaLoraCallback
    from peftkit_adalora.layer import AdaLoraLayer

__version__ = "0.2.0"
__all__ = ["AdaLoraCallback", "AdaLoraConfig", "AdaLoraLayer", "__version__"]

# Imported on first use: the layer imports torch, and the callback transformers, and loading the plugin
# (peftkit methods) imports neither.
_LAZY = {"AdaLoraLayer": "peftkit_adalora.layer", "AdaLoraCallback": "peftkit_adalora.callback"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_adalora' has no attribute {name!r}")
