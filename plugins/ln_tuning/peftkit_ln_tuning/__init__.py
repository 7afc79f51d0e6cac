"""LN tuning for peftkit: each targeted norm layer runs a trainable copy of itself."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_ln_tuning.config import LNTuningConfig

if TYPE_CHECKING:
    from peftkit_ln_tuning.layer import LNTuningLayer

__version__ = "0.1.1"
__all__ = ["LNTuningConfig", "LNTuningLayer", "__version__"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"LNTuningLayer": "peftkit_ln_tuning.layer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_ln_tuning' has no attribute {name!r}")
