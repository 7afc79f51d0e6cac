"""P-tuning for peftkit: virtual-token embeddings made by a trained prompt encoder, placed before the input."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_p_tuning.config import PromptEncoderConfig

if TYPE_CHECKING:
    from peftkit_p_tuning.encoder import PromptEncoder

__version__ = "0.1.3"
__all__ = ["PromptEncoder", "PromptEncoderConfig", "__version__"]

# Imported on first use: the encoder imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"PromptEncoder": "peftkit_p_tuning.encoder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_p_tuning' has no attribute {name!r}")
