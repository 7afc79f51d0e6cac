"""LoKr for peftkit: W x + (alpha / r) · (W1 ⊗ W2) x, where W1 and W2 may each be a low-rank product."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_lokr.config import LoKrConfig

if TYPE_CHECKING:
    from peftkit_lokr.layer import LoKrLayer, factorization

__version__ = "0.2.0"
__all__ = ["LoKrConfig", "LoKrLayer", "__version__", "factorization"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {name: "peftkit_lokr.layer" for name in ("LoKrLayer", "factorization")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_lokr' has no attribute {name!r}")
