"""bitsandbytes' layer hooks: a backend, so it registers no method and every weight method gains 4-bit and 8-bit bases.

Each hook answers only for ``bnb.nn.Linear4bit`` and ``bnb.nn.Linear8bitLt`` and leaves every other layer
to the core (None).

Loading this plugin imports neither bitsandbytes nor torch. A bitsandbytes layer can only exist once
``bitsandbytes`` is imported (by the user, or by transformers loading a quantized model), so every hook
first looks in ``sys.modules``: before that, no layer is this plugin's, and the answer is None without
importing anything. Only then does it import :mod:`peftkit_bnb.layers`, which imports bitsandbytes.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING

from peftkit import hookimpl
from peftkit.layer_access import LINEAR, LayerFeatures

if TYPE_CHECKING:
    import torch
    from torch import nn


def _layers() -> ModuleType | None:
    """:mod:`peftkit_bnb.layers`, or None while bitsandbytes is not imported (so no layer can be its)."""
    if "bitsandbytes" not in sys.modules:
        return None
    from peftkit_bnb import layers  # imports bitsandbytes, which is loaded already

    return layers


def _knows(layer: nn.Module) -> ModuleType | None:
    layers = _layers()
    return layers if layers is not None and (layers.is_4bit(layer) or layers.is_8bit(layer)) else None


@hookimpl
def peftkit_layer_features(layer: nn.Module) -> LayerFeatures | None:
    if _knows(layer) is None:
        return None
    return LayerFeatures(LINEAR, layer.in_features, layer.out_features, quantized=True)


@hookimpl
def peftkit_read_weight(layer: nn.Module) -> torch.Tensor | None:
    layers = _layers()
    if layers is None:
        return None
    if layers.is_4bit(layer):
        return layers.read_4bit(layer)
    if layers.is_8bit(layer):
        return layers.read_8bit(layer)
    return None


@hookimpl
def peftkit_write_weight(layer: nn.Module, weight: torch.Tensor) -> bool | None:
    layers = _layers()
    if layers is None:
        return None
    if layers.is_4bit(layer):
        layers.write_4bit(layer, weight)
        return True
    if layers.is_8bit(layer):
        layers.write_8bit(layer, weight)
        return True
    return None


@hookimpl
def peftkit_prepare_base_layer(layer: nn.Module) -> None:
    layers = _layers()
    if layers is not None and layers.is_4bit(layer):
        layers.keep_unpacked(layer)


@hookimpl
def peftkit_dense_layer(layer: nn.Module, dtype: torch.dtype | None) -> nn.Module | None:
    layers = _knows(layer)
    if layers is None:
        return None
    return layers.dense_linear(layer, dtype)
