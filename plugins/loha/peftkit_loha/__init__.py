"""LoHa for peftkit: W x + (alpha / r) · ((W1a W1b) ⊙ (W2a W2b)) x, with W2b zero at init."""

from peftkit_loha.config import LoHaConfig
from peftkit_loha.layer import LoHaLayer

__version__ = "0.1.0"
__all__ = ["LoHaConfig", "LoHaLayer", "__version__"]
