"""Prefix tuning for peftkit: learned key/value vectors placed before the keys and values of every attention layer."""

from peftkit_prefix_tuning.config import PrefixTuningConfig
from peftkit_prefix_tuning.prefix import PrefixEncoder

__version__ = "0.1.0"
__all__ = ["PrefixEncoder", "PrefixTuningConfig", "__version__"]
