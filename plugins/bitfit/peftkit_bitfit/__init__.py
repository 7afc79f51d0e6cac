"""BitFit for peftkit: y = base(x) + Δb on every bias of the model (Ben Zaken et al. 2022).

Only trained offsets Δb to the existing biases (LayerNorms' included) train and are saved (and, with
``train_layer_norm``, offsets to each LayerNorm's weight); the base model's own tensors never change until
a merge.
"""

from peftkit_bitfit.config import BitFitConfig
from peftkit_bitfit.layer import BitFitChannelNorm, BitFitLayer, BitFitLayerNorm

__version__ = "0.2.0"
__all__ = ["BitFitChannelNorm", "BitFitConfig", "BitFitLayer", "BitFitLayerNorm", "__version__"]
