"""What a method needs to know of a base layer, whatever its type (dense, transposed, quantized).

Methods never look at ``layer.weight`` directly: they ask the layer hooks, through
:mod:`peftkit.plugins`, so a backend plugin can add layer types without any method changing.
"""

from __future__ import annotations

from dataclasses import dataclass

LINEAR, CONV1D, CONV2D, CONV3D, EMBEDDING = "linear", "conv1d", "conv2d", "conv3d", "embedding"
KINDS = (LINEAR, CONV1D, CONV2D, CONV3D, EMBEDDING)


@dataclass(frozen=True)
class LayerFeatures:
    """A base layer's kind and sizes.

    ``in_features``/``out_features`` are input and output channels for convolutions and
    ``num_embeddings``/``embedding_dim`` for embeddings. ``fan_in_fan_out`` is True where the layer stores
    its weight as ``(in, out)`` (transformers' ``Conv1D``); the weight hooks hide that layout.
    """

    kind: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    fan_in_fan_out: bool = False
    quantized: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LayerFeatures.kind must be one of {KINDS}, got {self.kind!r}")
