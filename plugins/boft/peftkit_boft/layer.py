"""The BOFT layer: ``y = s ⊙ (W (x M)) + b``, the input turned by the butterfly ``M`` and the output scaled.

``M`` (see :mod:`peftkit_boft.butterfly`) is orthogonal and starts at the identity, and the scale
``s`` (``boft_s``, one per output feature, shape ``(out_features, 1)``) starts at 1, so a new adapter
changes nothing. Several active adapters compose as PEFT composes them: ``x M_last ⋯ M_first``, and
the product of their scales.

Merging folds both into the weight, ``W' = diag(s) W Mᵀ``, leaving the bias alone. Unmerging divides
by ``s`` and solves ``X Mᵀ = W' / s`` in float64; the core's residual (:mod:`peftkit.exact_unmerge`)
turns that into the original weight bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from peftkit import AdapterLayer, ConfigError
from peftkit.layer_access import LINEAR
from torch import nn

from peftkit_boft.butterfly import butterfly_matrix, drop_blocks, rotations, turn
from peftkit_boft.config import BOFTConfig


def divisors_near(total: int, wanted: int, count: int = 3) -> list[int]:
    """The ``count`` divisors of ``total`` closest to ``wanted``, for error messages."""
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - wanted), d))[:count])


def block_layout(features: int, config: BOFTConfig, module_name: str) -> tuple[int, int]:
    """(number of blocks, block size) for a layer of ``features`` inputs, with PEFT's checks; the error
    names the layer, the field, its value and values that would fit."""
    factor = config.boft_n_butterfly_factor
    where = f"the {features} input features of {module_name!r}"
    if config.boft_block_num:
        count = config.boft_block_num
        if features % count:
            raise ConfigError(
                f"BOFTConfig.boft_block_num={count} must divide {where}: "
                f"try one of {divisors_near(features, count)}"
            )
        size = features // count
        if factor > 1 and size % 2:
            raise ConfigError(
                f"BOFTConfig.boft_block_num={count} cuts {where} into blocks of {size}, an odd size, but "
                f"boft_n_butterfly_factor={factor} needs even blocks (its permutations move half blocks)"
            )
        return count, size
    size = config.boft_block_size
    if features % size:
        raise ConfigError(
            f"BOFTConfig.boft_block_size={size} must divide {where}: try one of {divisors_near(features, size)}"
        )
    span = size * 2 ** (factor - 1)
    if features % span:
        largest = max(f for f in range(1, factor) if features % (size * 2 ** (f - 1)) == 0)
        raise ConfigError(
            f"BOFTConfig.boft_n_butterfly_factor={factor} with boft_block_size={size} needs "
            f"boft_block_size x 2**(boft_n_butterfly_factor - 1) = {span} to divide {where}: "
            f"use boft_n_butterfly_factor <= {largest} or another boft_block_size"
        )
    return features // size, size


class BOFTLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("boft_R", "boft_s")
    adapter_state_names: ClassVar[tuple[str, ...]] = ("boft_dropout",)
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR,)

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_dropout: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: BOFTConfig, module_name: str) -> None:
        blocks, size = block_layout(self.features.in_features, config, module_name)
        raw = nn.Parameter(torch.zeros(config.boft_n_butterfly_factor, blocks, size, size))
        scale = nn.Parameter(torch.ones(self.features.out_features, 1))
        if not config.init_weights:  # PEFT's test init, drawn in PEFT's order
            nn.init.normal_(raw, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self._move_to_base(raw, scale, float_dtype=torch.float32)
        self.boft_R[adapter_name] = raw
        self.boft_s[adapter_name] = scale
        self.boft_dropout[adapter_name] = config.boft_dropout

    def tensor_to_load(self, adapter_name: str, name: str, saved: torch.Tensor) -> torch.Tensor:
        held = self.boft_R.get(adapter_name) if name == "boft_R" else None
        if held is None or saved.dim() != 4 or saved.shape[0] != 1 or held.shape[0] == 1:
            return saved
        if saved.shape[1:] != held.shape[1:]:
            return saved  # the loader's shape check reports it
        # PEFT without its CUDA extension (fbd_cuda) builds one factor whatever boft_n_butterfly_factor says.
        # Further factors at A = 0 are identities, so the outputs are the ones PEFT computes.
        warnings.warn(
            "BOFT: this adapter's boft_R holds one butterfly factor (PEFT saves one when its CUDA extension "
            "is missing, whatever boft_n_butterfly_factor says); the other factors load as identities, "
            "which gives PEFT's outputs",
            stacklevel=2,
        )
        return torch.cat([saved, saved.new_zeros(held.shape[0] - 1, *saved.shape[1:])])

    # --- forward ----------------------------------------------------------------------------------
    def turned(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x M`` for one adapter (with its block dropout while training)."""
        blocks = rotations(self.boft_R[adapter_name])
        p = self.boft_dropout[adapter_name]
        if self.training and p > 0:
            blocks = drop_blocks(blocks, p)
        return turn(x.to(blocks.dtype), blocks).to(x.dtype)

    def scaled(self, result: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``s ⊙ (result - b) + b``: the scale reaches the weight's part of the output, not the bias."""
        bias = self.bias
        if bias is None:
            return (result * scale).to(result.dtype)
        return ((result - bias) * scale + bias).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._mixed_rows(x, *args, **kwargs)
        pending = [name for name in self.active_adapters if name not in self.merged_adapters]
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        # as PEFT: x (M_last ⋯ M_first), so the last adapter turns x first
        for name in reversed(pending):
            x = self.turned(name, x)
        scale = self.boft_s[pending[0]].squeeze(-1)
        for name in pending[1:]:
            scale = scale * self.boft_s[name].squeeze(-1)
        return self.scaled(self.base_layer(x, *args, **kwargs), scale)

    def _mixed_rows(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch: each row turned and scaled by its own adapter, then one pass of the base layer."""
        rows = self.row_adapters
        rows.check_rows(x.shape[0], type(self).__name__)
        turned = x
        scale = torch.ones(x.shape[0], self.features.out_features, device=x.device)
        for name in rows.adapters():
            if name not in self.boft_R:
                continue
            selected = torch.tensor([row_name == name for row_name in rows.names], device=x.device)
            turned = turned.index_put((selected,), self.turned(name, x[selected]))
            scale = torch.where(selected[:, None], self.boft_s[name].reshape(1, -1).to(scale.dtype), scale)
        scale = scale.reshape(x.shape[0], *[1] * (x.dim() - 2), -1)
        return self.scaled(self.base_layer(turned, *args, **kwargs), scale)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        raise NotImplementedError("BOFT turns the layer's input: BOFTLayer.forward applies it before the base layer")

    # --- merging ----------------------------------------------------------------------------------
    def _matrix_and_scale(self, adapter_name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = rotations(self.boft_R[adapter_name].detach())
        return butterfly_matrix(blocks).to(weight.device), self.boft_s[adapter_name].detach().to(weight.device)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``diag(s) W Mᵀ``: the base layer then computes ``s ⊙ ((x M) Wᵀ)``."""
        matrix, scale = self._matrix_and_scale(adapter_name, weight)
        compute = torch.promote_types(weight.dtype, matrix.dtype)
        return (scale.to(compute) * (weight.to(compute) @ matrix.to(compute).T)).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``(W' / s) (Mᵀ)⁻¹`` in float64; the core's merge residual then restores the exact original."""
        matrix, scale = self._matrix_and_scale(adapter_name, weight)
        unscaled = weight.to(torch.float64) / scale.to(torch.float64)
        # X Mᵀ = W' / s
        return torch.linalg.solve(matrix.to(torch.float64).T, unscaled, left=False).to(weight.dtype)
