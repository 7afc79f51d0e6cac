"""Prompt tuning for peftkit: trainable virtual-token embeddings placed before the input embeddings."""

from peftkit_prompt_tuning.config import PromptTuningConfig
from peftkit_prompt_tuning.embedding import PromptEmbedding

__version__ = "0.3.0"
__all__ = ["PromptEmbedding", "PromptTuningConfig", "__version__"]
