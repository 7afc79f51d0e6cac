"""The (IA)³ layer: a learned vector ``l`` scales a layer's input or its output.

- feed-forward layers (``feedforward_modules``) scale the input:  ``y = W (x ⊙ l) + b``
- every other targeted layer scales the output:                    ``y = (W x + b) ⊙ l``

``l`` has one entry per input (or output) channel and is stored in PEFT's shapes: ``(1, in)`` and
``(out, 1)`` for linear layers (``nn.Linear`` and transformers' ``Conv1D``), ``(1, channels, 1, …)``
for convolutions. Several active adapters multiply their vectors.

Merging folds ``l`` into the weight: input scaling multiplies the weight's columns (input channels),
output scaling its rows (output channels) and the bias. Unmerging divides again, except where the
merge lost the weight: an entry of ``l`` whose products with the weight leave the dtype's normal range
(zero, or so small that the merged values fall below the smallest normal number, or so large that
they overflow). For those entries the merge keeps an exact copy of their rows or columns (and bias
entries), and the unmerge puts the copy back instead of dividing.
"""

from __future__ import annotations

import functools
import re
from typing import ClassVar

import torch
from peftkit import AdapterLayer
from peftkit.layer_access import CONV2D, CONV3D, LINEAR
from torch import nn

from peftkit_ia3.config import IA3Config


def is_feedforward(feedforward_modules: list[str] | str, module_path: str) -> bool:
    """PEFT's rule: a regex must match the whole path; a list name matches the end of the path."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_path) is not None
    return any(module_path.endswith(name) for name in feedforward_modules)


def scaled(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``tensor ⊙ factor`` computed in the factor's dtype (fp32 adapters on a half model), cast back."""
    return (tensor.to(factor.dtype) * factor).to(tensor.dtype)


def unrecoverable(factor: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Where ``tensor * factor`` cannot be divided back: the product leaves the dtype's normal range.

    Measured against the tensor's largest magnitude: a smaller element that still lands among the
    subnormals loses no more than one rounding step of that largest magnitude.
    """
    info = torch.finfo(tensor.dtype)
    magnitude = tensor.detach().abs().max().double() if tensor.numel() else torch.tensor(0.0)
    products = factor.detach().abs().double() * magnitude
    return ~torch.isfinite(factor) | (products < info.tiny) | (products > info.max)


class IA3Layer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("ia3_l",)
    adapter_state_names: ClassVar[tuple[str, ...]] = ("is_feedforward", "exact_copies")
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV2D, CONV3D)

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        # adapter name -> "weight"/"bias" -> (where the merge lost the tensor, its values there before)
        self.exact_copies: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        feedforward = is_feedforward(config.feedforward_modules, module_name)
        self.is_feedforward[adapter_name] = feedforward
        if self.features.fan_in_fan_out:
            config.fan_in_fan_out = True  # as PEFT records it for transformers' Conv1D
        shape = self._vector_shape(feedforward)
        vector = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self._move_to_base(self.ia3_l[adapter_name], float_dtype=torch.float32)

    # Model code reads a wrapped layer's weight (T5's feed-forward block checks ``self.wo.weight.dtype``),
    # as it can through PEFT's layers.
    def _vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        f = self.features
        channels = f.in_features if feedforward else f.out_features
        if f.kind == LINEAR:
            return (1, channels) if feedforward else (channels, 1)
        return (1, channels) + (1,) * len(f.kernel_size)

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_batch_forward(x, *args, **kwargs)
        pending = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        scaling_input = [name for name in pending if self.is_feedforward[name]]
        if not scaling_input:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(scaled(x, self._activation_factor(scaling_input)), *args, **kwargs)
        return self.adapter_output(x, result, pending)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row scaled by its own adapter's vectors: the vectors are stacked and gathered per row."""
        self.row_adapters.check_rows(x.shape[0], type(self).__name__)
        input_factor = self._row_factors(feedforward=True, like=x)
        result = self.base_layer(x if input_factor is None else scaled(x, input_factor), *args, **kwargs)
        output_factor = self._row_factors(feedforward=False, like=result)
        return result if output_factor is None else scaled(result, output_factor)

    def _row_factors(self, feedforward: bool, like: torch.Tensor) -> torch.Tensor | None:
        """Per row, the vector of its adapter (ones for other rows), shaped to broadcast against ``like``."""
        held = tuple(
            name
            for name in self.row_adapters.adapters()
            if name in self.ia3_l and self.is_feedforward[name] == feedforward
        )
        if not held:
            return None
        vectors = [self.ia3_l[name].flatten() for name in held]
        table = torch.stack(vectors + [torch.ones_like(vectors[0])])  # row -1 picks the ones
        factors = table[self.row_adapters.row_index(held, like.device)]
        if self.features.kind == LINEAR:
            return factors.view(factors.shape[0], *([1] * (like.dim() - 2)), factors.shape[1])
        return factors.view(*factors.shape, *([1] * (like.dim() - 2)))

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        scaling_output = [name for name in adapter_names if not self.is_feedforward[name]]
        if not scaling_output:
            return result
        return scaled(result, self._activation_factor(scaling_output))

    def _activation_factor(self, adapter_names: list[str]) -> torch.Tensor:
        """The product of the adapters' vectors, shaped to broadcast over features (last dim) or channels (dim 1)."""
        vectors = [self.ia3_l[name] for name in adapter_names]
        product = functools.reduce(torch.mul, vectors)
        return product.flatten() if self.features.kind == LINEAR else product

    # --- merging ----------------------------------------------------------------------------------
    def _weight_factor(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``l`` shaped to broadcast over the weight, laid out ``(out, in / groups, *kernel)``."""
        vector = self.ia3_l[adapter_name].detach().flatten()
        kernel = (1,) * (weight.dim() - 2)
        if not self.is_feedforward[adapter_name]:
            return vector.reshape(-1, 1, *kernel)
        groups = getattr(self.get_base_layer(), "groups", 1) if self.features.kind != LINEAR else 1
        if groups == 1:
            return vector.reshape(1, -1, *kernel)
        # grouped convolution: output channel o sees input channels of its group only
        out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
        per_output = vector.reshape(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
        return per_output.reshape(weight.shape[0], in_per_group, *kernel)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        factor = self._weight_factor(adapter_name, weight)
        self._keep_exact_copy(adapter_name, "weight", weight, factor)
        return (weight * factor).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._divided_back(adapter_name, "weight", weight, self._weight_factor(adapter_name, weight))

    def merged_bias(self, adapter_name: str, bias: torch.Tensor) -> torch.Tensor | None:
        if self.is_feedforward[adapter_name]:
            return None  # y = W (x ⊙ l) + b: the bias is not scaled
        factor = self.ia3_l[adapter_name].detach().flatten()
        self._keep_exact_copy(adapter_name, "bias", bias, factor)
        return (bias * factor).to(bias.dtype)

    def unmerged_bias(self, adapter_name: str, bias: torch.Tensor) -> torch.Tensor | None:
        if self.is_feedforward[adapter_name]:
            return None
        return self._divided_back(adapter_name, "bias", bias, self.ia3_l[adapter_name].detach().flatten())

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        super().unmerge(adapter_names)
        for name in [name for name in self.exact_copies if name not in self.merged_adapters]:
            del self.exact_copies[name]

    def _keep_exact_copy(
        self, adapter_name: str, what: str, tensor: torch.Tensor, factor: torch.Tensor
    ) -> None:
        lost = unrecoverable(factor, tensor).expand_as(tensor)
        self.exact_copies.setdefault(adapter_name, {})[what] = (lost, tensor[lost].clone())

    def _divided_back(
        self, adapter_name: str, what: str, tensor: torch.Tensor, factor: torch.Tensor
    ) -> torch.Tensor:
        # read, not popped: a merge asks for the unmerged weight once already (peftkit.exact_unmerge)
        lost, values = self.exact_copies[adapter_name][what]
        lost = lost.to(tensor.device)
        divisor = torch.where(lost, torch.ones_like(factor), factor)
        restored = (tensor / divisor).to(tensor.dtype)
        restored[lost] = values.to(device=tensor.device, dtype=tensor.dtype)
        return restored
