"""Trainable tokens for peftkit: only the chosen rows of the token embedding train."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_trainable_tokens.config import TrainableTokensConfig

if TYPE_CHECKING:
    from peftkit_trainable_tokens.layer import TrainableTokensLayer

__version__ = "0.2.0"
__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "__version__"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"TrainableTokensLayer": "peftkit_trainable_tokens.layer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_trainable_tokens' has no attribute {name!r}")
