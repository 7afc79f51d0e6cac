"""BitFit for peftkit: y = base(x) + Δb on every bias of the model (Ben Zaken et al. 2022).

Only trained offsets Δb to the existing biases (LayerNorms' included) train and are saved (and, with
``train_layer_norm``, offsets to each LayerNorm's weight); the base model's own tensors never change until
a merge.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit_bitfit.config import BitFitConfig

if TYPE_CHECKING:
    from peftkit_bitfit.layer import BitFitChannelNorm, BitFitLayer, BitFitLayerNorm

__version__ = "0.2.1"
__all__ = ["BitFitChannelNorm", "BitFitConfig", "BitFitLayer", "BitFitLayerNorm", "__version__"]

# Imported on first use: the layer module imports torch, and loading the plugin (peftkit methods) does not.
_LAZY = {name: "peftkit_bitfit.layer" for name in ("BitFitChannelNorm", "BitFitLayer", "BitFitLayerNorm")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_bitfit' has no attribute {name!r}")
