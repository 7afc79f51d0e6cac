"""VeRA for peftkit: h = W x + Λ_b B Λ_d A x, with A and B random, frozen and shared across layers."""

from peftkit_vera.config import VeraConfig
from peftkit_vera.layer import VeraLayer, VeraProjections

__version__ = "0.1.0"
__all__ = ["VeraConfig", "VeraLayer", "VeraProjections", "__version__"]
