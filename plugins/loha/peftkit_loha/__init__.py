"""LoHa for peftkit: W x + (alpha / r) · ((W1a W1b) ⊙ (W2a W2b)) x, with W2b zero at init."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_loha.config import LoHaConfig

if TYPE_CHECKING:
    from peftkit_loha.layer import LoHaLayer

__version__ = "0.2.0"
__all__ = ["LoHaConfig", "LoHaLayer", "__version__"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"LoHaLayer": "peftkit_loha.layer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_loha' has no attribute {name!r}")
