"""BitFit for peftkit: y = base(x) + Δb on every layer with a bias (Ben Zaken et al. 2022).

Only trained offsets Δb to the existing biases train and are saved (and, with ``train_layer_norm``,
offsets to each LayerNorm's weight and bias); the base model's own tensors never change until a merge.
"""

from peftkit_bitfit.config import BitFitConfig
from peftkit_bitfit.layer import BitFitLayer, BitFitLayerNorm

__version__ = "0.1.0"
__all__ = ["BitFitConfig", "BitFitLayer", "BitFitLayerNorm", "__version__"]
