"""VeRA for peftkit: h = W x + Λ_b B Λ_d A x, with A and B random, frozen and shared across layers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_vera.config import VeraConfig

if TYPE_CHECKING:
    from peftkit_vera.layer import VeraLayer, VeraProjections

__version__ = "0.2.0"
__all__ = ["VeraConfig", "VeraLayer", "VeraProjections", "__version__"]

# Imported on first use: the layer module imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {name: "peftkit_vera.layer" for name in ("VeraLayer", "VeraProjections")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_vera' has no attribute {name!r}")
