"""(IA)³ for peftkit: a learned vector l scales a layer's input, W (x ⊙ l) + b, or its output, (W x + b) ⊙ l."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_ia3.config import IA3Config

if TYPE_CHECKING:
    from peftkit_ia3.layer import IA3Layer

__version__ = "0.2.2"
__all__ = ["IA3Config", "IA3Layer", "__version__"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"IA3Layer": "peftkit_ia3.layer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_ia3' has no attribute {name!r}")
