"""The LoRA layer: ΔW = scaling · B A, added to the base output as scaling · B(A(dropout(x)))."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from peftkit import AdapterLayer
from peftkit.layer_access import CONV1D, CONV2D, CONV3D, EMBEDDING, LINEAR
from torch import nn

from peftkit_lora.config import LoraConfig

_CONV = {CONV1D: (nn.Conv1d, F.conv1d), CONV2D: (nn.Conv2d, F.conv2d), CONV3D: (nn.Conv3d, F.conv3d)}


def pattern_value(patterns: dict, module_path: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


class LoraLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
    )
    adapter_state_names: ClassVar[tuple[str, ...]] = ("lora_dropout", "r", "lora_alpha", "scaling")
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, CONV2D, CONV3D, EMBEDDING)

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / (math.sqrt(r) if config.use_rslora else r)
        if self.features.fan_in_fan_out:
            config.fan_in_fan_out = True  # as PEFT records it for transformers' Conv1D
        f = self.features
        if f.kind == EMBEDDING:
            self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, f.in_features))
            self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(f.out_features, r))
        elif f.kind == LINEAR:
            self.lora_A[adapter_name] = nn.Linear(f.in_features, r, bias=False)
            self.lora_B[adapter_name] = nn.Linear(r, f.out_features, bias=False)
        else:
            conv, _ = _CONV[f.kind]
            if getattr(self.get_base_layer(), "groups", 1) != 1:
                raise ValueError(f"LoRA on grouped convolutions is not supported ({module_name})")
            ones = (1,) * len(f.kernel_size)
            self.lora_A[adapter_name] = conv(f.in_features, r, f.kernel_size, f.stride, f.padding, bias=False)
            self.lora_B[adapter_name] = conv(r, f.out_features, ones, ones, bias=False)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self._init(adapter_name, config.init_lora_weights)
        self._move_to_base(*(p for _, p in self.adapter_parameters(adapter_name)), float_dtype=torch.float32)

    def _init(self, adapter_name: str, init: bool | str) -> None:
        if init is False:  # leave the random init: a non-identity adapter, as PEFT does for tests
            if adapter_name in self.lora_embedding_A:
                nn.init.normal_(self.lora_embedding_A[adapter_name])
                nn.init.normal_(self.lora_embedding_B[adapter_name])
            return
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
            return
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        out_dtype = result.dtype
        for name in adapter_names:
            if self.features.kind == EMBEDDING:
                base = self.get_base_layer()
                a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
                after_a = F.embedding(
                    x,
                    a.T,
                    base.padding_idx,
                    base.max_norm,
                    base.norm_type,
                    base.scale_grad_by_freq,
                    base.sparse,
                )
                result = result + (after_a @ b.T).to(out_dtype) * self.scaling[name]
            else:
                a, b = self.lora_A[name], self.lora_B[name]
                h = self.lora_dropout[name](x.to(a.weight.dtype))
                result = result + (b(a(h)) * self.scaling[name]).to(out_dtype)
        return result

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        scaling = self.scaling[adapter_name]
        if self.features.kind == EMBEDDING:
            return (self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]).T * scaling
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if self.features.kind == LINEAR:
            return (b @ a) * scaling
        _, conv_fn = _CONV[self.features.kind]
        return conv_fn(a.transpose(0, 1), b).transpose(0, 1) * scaling
