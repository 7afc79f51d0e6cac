"""Bottleneck adapters for peftkit: h + scaling · up(act(down(h))) after a block, or beside it (parallel).

``down`` maps d → d // reduction_factor features and ``up`` maps back; ``up`` starts at zero, so a new
adapter changes nothing until it trains. Styles: Houlsby (after attention and feed-forward), Pfeiffer
(after feed-forward), parallel (beside feed-forward, fed its input).
"""

from peftkit_bottleneck.config import BottleneckConfig
from peftkit_bottleneck.layer import BottleneckLayer

__version__ = "0.1.0"
__all__ = ["BottleneckConfig", "BottleneckLayer", "__version__"]
