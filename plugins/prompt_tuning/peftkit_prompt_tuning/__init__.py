"""Prompt tuning for peftkit: trainable virtual-token embeddings placed before the input embeddings."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_prompt_tuning.config import PromptTuningConfig

if TYPE_CHECKING:
    from peftkit_prompt_tuning.embedding import PromptEmbedding

__version__ = "0.3.2"
__all__ = ["PromptEmbedding", "PromptTuningConfig", "__version__"]

# Imported on first use: the embedding imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"PromptEmbedding": "peftkit_prompt_tuning.embedding"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_prompt_tuning' has no attribute {name!r}")
