"""Prefix tuning for peftkit: learned key/value vectors placed before the keys and values of every attention layer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_prefix_tuning.config import PrefixTuningConfig

if TYPE_CHECKING:
    from peftkit_prefix_tuning.prefix import PrefixEncoder

__version__ = "0.1.3"
__all__ = ["PrefixEncoder", "PrefixTuningConfig", "__version__"]

# Imported on first use: the encoder imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"PrefixEncoder": "peftkit_prefix_tuning.prefix"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_prefix_tuning' has no attribute {name!r}")
