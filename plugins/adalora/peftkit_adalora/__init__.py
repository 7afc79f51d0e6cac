"""AdaLoRA for peftkit: W x + (lora_alpha / init_r) · P Λ Q x, its ranks pruned by importance in training."""

from typing import Any

from peftkit_adalora.config import AdaLoraConfig
from peftkit_adalora.layer import AdaLoraLayer

__version__ = "0.1.0"
__all__ = ["AdaLoraCallback", "AdaLoraConfig", "AdaLoraLayer", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "AdaLoraCallback":  # imports transformers only when asked for
        from peftkit_adalora.callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module 'peftkit_adalora' has no attribute {name!r}")
