"""LoRA for peftkit: W x + (alpha / r) · B A x, with A: in → r and B: r → out, B zero at init."""

from peftkit_lora.config import LoraConfig
from peftkit_lora.layer import LoraLayer

__version__ = "0.3.1"
__all__ = ["LoraConfig", "LoraLayer", "__version__"]
