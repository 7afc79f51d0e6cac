"""(IA)³ for peftkit: a learned vector l scales a layer's input, W (x ⊙ l) + b, or its output, (W x + b) ⊙ l."""

from peftkit_ia3.config import IA3Config
from peftkit_ia3.layer import IA3Layer

__version__ = "0.2.0"
__all__ = ["IA3Config", "IA3Layer", "__version__"]
