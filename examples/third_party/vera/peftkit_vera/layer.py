"""VeRA on one linear layer: h = W x + Λ_b B Λ_d A x, so ΔW = diag(b) B diag(d) A.

A (r × in) and B (out × r) come from :class:`VeraProjections`, one pair per adapter shared by every
layer it adapts, sized to the largest layer: each layer uses the top-left block it needs,
``A[:, :in]`` and ``B[:out, :]``. The layer's own trained tensors are the two vectors
``vera_lambda_d`` (d, r) and ``vera_lambda_b`` (b, out).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from peftkit import AdapterLayer
from peftkit.composition import TOKEN_WISE_BLOCKS
from peftkit.layer_access import LINEAR
from torch import nn

from peftkit_vera.config import VeraConfig


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform for a ReLU gain, fan-in = ``shape[1]``: U(-b, b) with b = √3 · √2 / √fan_in."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random pair one adapter shares across its layers: buffers ``vera_A`` and ``vera_B``."""

    def __init__(self, r: int, in_features: int, out_features: int, prng_key: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(prng_key)
        # A first, then B, from one generator: the same draws as PEFT's, so a key gives PEFT's matrices
        self.register_buffer("vera_A", kaiming_uniform((r, in_features), generator))
        self.register_buffer("vera_B", kaiming_uniform((out_features, r), generator))

    def sliced(self, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_A[:, :in_features], self.vera_B[:out_features, :]


class VeraLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d")
    adapter_state_names: ClassVar[tuple[str, ...]] = ("vera_projections", "vera_dropout")
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR,)
    # its adapters add a per-token update, so the core's composed_output computes every block but Fuse
    composition_blocks: ClassVar[tuple[str, ...]] = TOKEN_WISE_BLOCKS

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_projections = nn.ModuleDict()  # set by the plugin once every layer is known
        self.vera_dropout = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: VeraConfig, module_name: str) -> None:
        if config.init_weights:  # b = 0: a new adapter changes nothing
            lambda_b = torch.zeros(self.features.out_features)
            lambda_d = torch.full((config.r,), float(config.d_initial))
        else:  # PEFT's non-identity start, for tests
            lambda_b = torch.ones(self.features.out_features)
            lambda_d = torch.randn(config.r)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout else nn.Identity()
        self._move_to_base(
            self.vera_lambda_b[adapter_name], self.vera_lambda_d[adapter_name], float_dtype=torch.float32
        )

    def share_projections(self, adapter_name: str, projections: VeraProjections) -> None:
        self.vera_projections[adapter_name] = projections

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_projections[adapter_name].sliced(self.features.in_features, self.features.out_features)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        for name in adapter_names:
            A, B = self._factors(name)
            lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
            x_in = self.vera_dropout[name](x.to(lambda_d.dtype))
            delta = lambda_b * ((lambda_d * (x_in @ A.T)) @ B.T)
            result = result + delta.to(result.dtype)
        return result

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self._factors(adapter_name)
        lambda_d, lambda_b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        return (lambda_b.unsqueeze(-1) * B) @ (lambda_d.unsqueeze(-1) * A)
