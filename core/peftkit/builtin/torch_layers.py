"""The layer hooks for PyTorch's own layers and transformers' Conv1D.

Loading this plugin imports no torch, so that listing plugins (``peftkit methods``) stays light: every
hook is handed a torch module, so torch is loaded by the time one runs, and each imports ``torch.nn``
then.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

from peftkit.layer_access import CONV1D, CONV2D, CONV3D, EMBEDDING, LINEAR, LayerFeatures
from peftkit.method import hookimpl

if TYPE_CHECKING:
    import torch
    from torch import nn

# transformers' GPT-2 style linear layer (weight stored (in, out)) lives in this module. Looked up, not
# imported: a Conv1D layer can only exist once its module is imported, and loading plugins (as
# `peftkit methods` does) must not pull in transformers.
_CONV1D_MODULE = "transformers.pytorch_utils"


def _is_transformers_conv1d(layer: nn.Module) -> bool:
    module = sys.modules.get(_CONV1D_MODULE)
    conv1d = getattr(module, "Conv1D", None)
    return conv1d is not None and isinstance(layer, conv1d)


@functools.cache
def _conv_kinds() -> dict[type[nn.Module], str]:
    from torch import nn  # loaded already: see the module docstring

    return {nn.Conv1d: CONV1D, nn.Conv2d: CONV2D, nn.Conv3d: CONV3D}


@hookimpl(trylast=True)
def peftkit_layer_features(layer: nn.Module) -> LayerFeatures | None:
    from torch import nn  # loaded already: see the module docstring

    if _foreign(layer):
        return None
    if isinstance(layer, nn.Linear):
        return LayerFeatures(LINEAR, layer.in_features, layer.out_features)
    if _is_transformers_conv1d(layer):
        in_features, out_features = layer.weight.shape
        return LayerFeatures(LINEAR, in_features, out_features, fan_in_fan_out=True)
    for conv_type, kind in _conv_kinds().items():
        if type(layer) is conv_type:
            return LayerFeatures(
                kind,
                layer.in_channels,
                layer.out_channels,
                kernel_size=tuple(layer.kernel_size),
                stride=tuple(layer.stride),
                padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                dilation=tuple(layer.dilation),
            )
    if type(layer) is nn.Embedding:
        return LayerFeatures(EMBEDDING, layer.num_embeddings, layer.embedding_dim)
    return None


def _foreign(layer: nn.Module) -> bool:
    """Subclasses of torch layers that pack their weight (bitsandbytes) need their own backend plugin."""
    return type(layer).__module__.split(".")[0] == "bitsandbytes"


def _is_transposed(layer: nn.Module) -> bool:
    return _is_transformers_conv1d(layer)


def _knows(layer: nn.Module) -> bool:
    from torch import nn  # loaded already: see the module docstring

    return (
        not _foreign(layer)
        and isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))
        or _is_transposed(layer)
    )


@hookimpl(trylast=True)
def peftkit_read_weight(layer: nn.Module) -> torch.Tensor | None:
    if not _knows(layer):
        return None
    weight = layer.weight.data
    return weight.T if _is_transposed(layer) else weight


@hookimpl(trylast=True)
def peftkit_write_weight(layer: nn.Module, weight: torch.Tensor) -> bool | None:
    if not _knows(layer):
        return None
    target = layer.weight.data
    target.copy_(weight.T if _is_transposed(layer) else weight)
    return True
