"""LoKr for peftkit: W x + (alpha / r) · (W1 ⊗ W2) x, where W1 and W2 may each be a low-rank product."""

from peftkit_lokr.config import LoKrConfig
from peftkit_lokr.layer import LoKrLayer, factorization

__version__ = "0.1.1"
__all__ = ["LoKrConfig", "LoKrLayer", "__version__", "factorization"]
