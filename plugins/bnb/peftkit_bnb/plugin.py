"""bitsandbytes' layer hooks: a backend, so it registers no method and every weight method gains 4-bit and 8-bit bases.

Each hook answers only for ``bnb.nn.Linear4bit`` and ``bnb.nn.Linear8bitLt`` and leaves every other layer
to the core (None).
"""

from __future__ import annotations

import torch
from peftkit import LayerFeatures, hookimpl
from peftkit.layer_access import LINEAR
from torch import nn

from peftkit_bnb import layers


def _knows(layer: nn.Module) -> bool:
    return layers.is_4bit(layer) or layers.is_8bit(layer)


@hookimpl
def peftkit_layer_features(layer: nn.Module) -> LayerFeatures | None:
    if not _knows(layer):
        return None
    return LayerFeatures(LINEAR, layer.in_features, layer.out_features, quantized=True)


@hookimpl
def peftkit_read_weight(layer: nn.Module) -> torch.Tensor | None:
    if layers.is_4bit(layer):
        return layers.read_4bit(layer)
    if layers.is_8bit(layer):
        return layers.read_8bit(layer)
    return None


@hookimpl
def peftkit_write_weight(layer: nn.Module, weight: torch.Tensor) -> bool | None:
    if layers.is_4bit(layer):
        layers.write_4bit(layer, weight)
        return True
    if layers.is_8bit(layer):
        layers.write_8bit(layer, weight)
        return True
    return None


@hookimpl
def peftkit_dense_layer(layer: nn.Module, dtype: torch.dtype | None) -> nn.Module | None:
    if not _knows(layer):
        return None
    return layers.dense_linear(layer, dtype)
