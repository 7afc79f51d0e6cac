"""P-tuning for peftkit: virtual-token embeddings made by a trained prompt encoder, placed before the input."""

from peftkit_p_tuning.config import PromptEncoderConfig
from peftkit_p_tuning.encoder import PromptEncoder

__version__ = "0.1.2"
__all__ = ["PromptEncoder", "PromptEncoderConfig", "__version__"]
