"""OFT for peftkit: a learned block-diagonal orthogonal matrix R rotates each targeted layer's input, W (x R) + b."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_oft.config import OFTConfig

if TYPE_CHECKING:
    from peftkit_oft.layer import OFTLayer

__version__ = "0.1.1"
__all__ = ["OFTConfig", "OFTLayer", "__version__"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"OFTLayer": "peftkit_oft.layer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_oft' has no attribute {name!r}")
