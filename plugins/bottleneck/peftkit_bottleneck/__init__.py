"""Bottleneck adapters for peftkit: h + scaling · up(act(down(h))) after a block, or beside it (parallel).

``down`` maps d → d // reduction_factor features and ``up`` maps back; ``up`` starts at zero, so a new
adapter changes nothing until it trains. Styles: Houlsby (after attention and feed-forward), Pfeiffer
(after feed-forward), parallel (beside feed-forward, fed its input).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_bottleneck.config import BottleneckConfig
from peftkit_bottleneck.fusion_config import AdapterFusionConfig

if TYPE_CHECKING:
    from peftkit_bottleneck.layer import BottleneckLayer

__version__ = "0.4.0"
__all__ = ["AdapterFusionConfig", "BottleneckConfig", "BottleneckLayer", "__version__"]

# Imported on first use: the layer imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {"BottleneckLayer": "peftkit_bottleneck.layer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_bottleneck' has no attribute {name!r}")
