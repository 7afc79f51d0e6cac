"""BOFT for peftkit: a learned butterfly product of block-diagonal rotations M turns each targeted layer's
input, and a learned vector s scales its output, y = s ⊙ (W (x M)) + b."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_boft.config import BOFTConfig

if TYPE_CHECKING:
    from peftkit_boft.layer import BOFTLayer

__version__ = "0.1.0"
__all__ = ["BOFTConfig", "BOFTLayer", "__version__"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"BOFTLayer": "peftkit_boft.layer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_boft' has no attribute {name!r}")
