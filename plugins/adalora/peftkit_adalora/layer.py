"""The AdaLoRA layer: ΔW = s · P Λ Q in SVD form, s = lora_alpha / (init_r + 1e-5).

PEFT's tensors, per adapter:

- ``lora_A`` = Q, ``r × in``: the right singular vectors (rows);
- ``lora_E`` = Λ, ``r × 1``: the singular values (zero at init, so a new adapter changes nothing);
- ``lora_B`` = P, ``out × r``: the left singular vectors (columns).

The layer adds ``s · P (Λ ⊙ (Q dropout(x)))``. Pruning a triplet (``P[:, i]``, ``Λ[i]``, ``Q[i]``) sets
``Λ[i]`` to zero while training; a saved adapter holds only the kept triplets. The scale keeps the
initial rank (PEFT's ``ranknum``) after pruning, so cutting the zeroed triplets away changes nothing.

The orthogonality penalty of AdaLoRA's loss is, per factor, ``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from peftkit import AdapterLayer
from peftkit.composition import TOKEN_WISE_BLOCKS
from peftkit.layer_access import LINEAR
from torch import nn

from peftkit_adalora.config import AdaLoraConfig

# PEFT divides by ranknum + 1e-5 (guarding a zero rank); kept so outputs agree to the last bits
RANKNUM_EPS = 1e-5
INIT_STD = 0.02  # PEFT's std for P and Q when init_lora_weights=True


def rank_pattern_key(module_path: str) -> str:
    """The key of a module in ``rank_pattern``, as PEFT saves it."""
    return f"{module_path}.lora_E"


def kept_triplets(rank_pattern: dict | None, module_path: str, adapter_name: str) -> list[bool] | None:
    """Which triplets of the module are kept, or None when the pattern does not name it.

    PEFT keys training-time patterns ``<path>.lora_E.<adapter>`` and saved ones ``<path>.lora_E``.
    """
    if not rank_pattern:
        return None
    key = rank_pattern_key(module_path)
    kept = rank_pattern.get(key, rank_pattern.get(f"{key}.{adapter_name}"))
    return list(kept) if kept is not None else None


class AdaLoraLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_E", "lora_B")
    adapter_state_names: ClassVar[tuple[str, ...]] = (
        "lora_dropout",
        "r",
        "ranknum",
        "lora_alpha",
        "module_path",
        "adapter_config",
        "sensitivity",
        "uncertainty",
    )
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR,)
    composition_blocks: ClassVar[tuple[str, ...]] = TOKEN_WISE_BLOCKS

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}  # the rank the tensors have now
        self.ranknum: dict[str, float] = {}  # the rank the scale divides by: init_r, also after pruning
        self.lora_alpha: dict[str, float] = {}
        self.module_path: dict[str, str] = {}
        self.adapter_config: dict[str, AdaLoraConfig] = {}  # the live config: its rank_pattern cuts the file
        # the rank allocator's smoothed statistics by adapter, then tensor name (peftkit_adalora.allocation)
        self.sensitivity: dict[str, dict[str, torch.Tensor]] = {}
        self.uncertainty: dict[str, dict[str, torch.Tensor]] = {}

    def update_layer(self, adapter_name: str, config: AdaLoraConfig, module_name: str) -> None:
        kept = kept_triplets(config.rank_pattern, module_name, adapter_name)
        r = sum(kept) if kept is not None else config.init_r
        self.r[adapter_name], self.ranknum[adapter_name] = r, float(config.init_r)
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.module_path[adapter_name], self.adapter_config[adapter_name] = module_name, config
        if self.features.fan_in_fan_out:
            config.fan_in_fan_out = True  # as PEFT records it for transformers' Conv1D
        f = self.features
        self.lora_A[adapter_name] = nn.Parameter(torch.empty(r, f.in_features))
        self.lora_E[adapter_name] = nn.Parameter(torch.empty(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.empty(f.out_features, r))
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self._init(adapter_name, config.init_lora_weights)
        self._move_to_base(*(p for _, p in self.adapter_parameters(adapter_name)), float_dtype=torch.float32)

    def _init(self, adapter_name: str, init: bool) -> None:
        if init:
            nn.init.zeros_(self.lora_E[adapter_name])
            nn.init.normal_(self.lora_A[adapter_name], std=INIT_STD)
            nn.init.normal_(self.lora_B[adapter_name], std=INIT_STD)
        else:  # all three standard normal: an adapter that acts from the start, as PEFT does for tests
            for tensors in (self.lora_A, self.lora_E, self.lora_B):
                nn.init.normal_(tensors[adapter_name])

    def scaling(self, adapter_name: str) -> float:
        return self.lora_alpha[adapter_name] / (self.ranknum[adapter_name] + RANKNUM_EPS)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        for name in adapter_names:
            q, singular_values, p = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(q.dtype))
            delta = (h @ (q * singular_values).T @ p.T) * self.scaling(name)
            result = result + delta.to(result.dtype)
        return result

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        q, singular_values, p = (
            self.lora_A[adapter_name],
            self.lora_E[adapter_name],
            self.lora_B[adapter_name],
        )
        return (p @ (q * singular_values)) * self.scaling(adapter_name)

    def orthogonality_penalties(self, adapter_name: str) -> list[torch.Tensor]:
        """‖QQᵀ − I‖_F and ‖PᵀP − I‖_F: how far the singular vectors are from orthonormal."""
        penalties = []
        q, p = self.lora_A[adapter_name], self.lora_B[adapter_name]
        for gram in (q @ q.T, p.T @ p):
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            penalties.append(torch.linalg.matrix_norm(gram - identity))
        return penalties

    # --- pruning --------------------------------------------------------------------------------------
    def kept(self, adapter_name: str) -> list[bool] | None:
        config = self.adapter_config[adapter_name]
        return kept_triplets(config.rank_pattern, self.module_path[adapter_name], adapter_name)

    def is_full_rank(self, adapter_name: str) -> bool:
        """True while the tensors have all init_r triplets (pruned ones zeroed, not cut away)."""
        return self.r[adapter_name] == int(self.ranknum[adapter_name])

    def zero_pruned(self, adapter_name: str, kept: torch.Tensor) -> None:
        """Set the singular value of every triplet not kept to zero."""
        with torch.no_grad():
            self.lora_E[adapter_name].masked_fill_(
                ~kept.view(-1, 1).to(self.lora_E[adapter_name].device), 0.0
            )

    def saved_tensors(self, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
        """With a rank pattern only the kept triplets (as PEFT saves them); else the tensors as they are."""
        tensors = self.adapter_parameters(adapter_name)
        if not tensors:  # the layer does not hold this adapter
            return tensors
        kept = self.kept(adapter_name)
        if kept is None or sum(kept) == self.r[adapter_name]:
            return tensors
        if not self.is_full_rank(adapter_name):
            raise ValueError(
                f"adapter {adapter_name!r} of {self.module_path[adapter_name]!r} has rank "
                f"{self.r[adapter_name]}, but its config's rank_pattern keeps {sum(kept)} of {len(kept)} "
                "triplets"
            )
        index = torch.tensor(kept, dtype=torch.bool, device=self.lora_E[adapter_name].device)
        cut = {"lora_A": lambda t: t[index], "lora_E": lambda t: t[index], "lora_B": lambda t: t[:, index]}
        return [(name, cut[name](tensor)) for name, tensor in tensors]
