"""The OFT layer: a learned block-diagonal orthogonal matrix ``R`` rotates the input, ``y = W (x R) + b``.

The input's features are cut into ``blocks`` groups of ``block_size``; each group is multiplied by its
own ``block_size x block_size`` matrix (or all by one, with ``block_share``). Each block is the Cayley
transform of a skew-symmetric ``Q``, ``R = (I - Q)(I + Q)⁻¹``, or with ``use_cayley_neumann`` the
truncated series ``I + 2Q + 2Q² + … + Qⁿ⁻¹`` (PEFT 0.21's terms, which approximate ``(I + Q)(I - Q)⁻¹``).
Only ``Q``'s strict upper triangle is trained and saved: ``oft_R.weight`` of shape
``(blocks or 1, block_size (block_size - 1) / 2)``, row-major, as PEFT stores it. ``Q = 0`` at init, so
``R = I`` and a new adapter changes nothing.

Rotating the input leaves the base layer untouched, so OFT wraps any layer that computes ``x Wᵀ + b``,
a quantized one included. Merging folds ``R`` into the weight, ``W' = W Rᵀ``; unmerging multiplies by
``(Rᵀ)⁻¹`` (the Neumann ``R`` is not exactly orthogonal, so an inverse, not a transpose) and the core's
residual (:mod:`peftkit.exact_unmerge`) makes the result the original weight bit for bit.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from peftkit import AdapterLayer
from peftkit.layer_access import LINEAR
from torch import nn

from peftkit_oft.config import OFTConfig


def nearest_divisor(total: int, wanted: int) -> int:
    """PEFT's fix for a block count or size that does not divide ``total``: the nearest divisor, the
    smaller one on a tie, and ``total`` itself when ``wanted`` is at least ``total``."""
    if wanted >= total:
        return total
    higher = wanted
    while higher <= total and total % higher:
        higher += 1
    lower = wanted
    while lower > 1 and total % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def skew_symmetric(upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """``Q - Qᵀ`` per block, from the strict upper triangles (one row of ``upper`` per block)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=upper.device)
    q = upper.new_zeros(upper.shape[0], block_size, block_size)
    q[:, rows, cols] = upper
    return q - q.transpose(-2, -1)


def upper_triangle(q: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(q.shape[-1], q.shape[-1], 1, device=q.device)
    return q[:, rows, cols]


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """The blocks of ``R`` from skew-symmetric ``q``: exact (``neumann_terms`` None) or PEFT's Neumann terms."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        # X (I + Q) = I - Q
        return torch.linalg.solve(eye + q, eye - q, left=False)
    rotation = eye.clone()
    if neumann_terms > 1:
        rotation = rotation + 2 * q
    if neumann_terms > 2:
        power = q @ q
        rotation = rotation + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            rotation = rotation + 2 * power
        rotation = rotation + power @ q  # the last term counts once, as in PEFT 0.21
    return rotation


def constrained(upper: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: each block's skew-symmetric matrix pulled back onto the Frobenius ball of radius
    ``eps / sqrt(blocks stored)`` around 0 where it left it."""
    q = skew_symmetric(upper, block_size)
    radius = eps / upper.shape[0] ** 0.5
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    inside = norm <= radius
    projected = torch.where(inside, q, radius * q / torch.where(inside, torch.ones_like(norm), norm))
    return upper_triangle(projected)


class OFTRotation(nn.Module):
    """One adapter's rotation on one layer; its parameter saves as PEFT's ``oft_R.weight``."""

    def __init__(self, blocks: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.blocks = blocks
        self.block_size = block_size
        self.block_share = config.block_share
        self.coft = config.coft
        self.eps = config.eps
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        stored = 1 if config.block_share else blocks
        self.weight = nn.Parameter(torch.zeros(stored, block_size * (block_size - 1) // 2))
        if not config.init_weights:
            nn.init.normal_(self.weight, mean=0.0, std=0.1)

    def blocks_of_r(self) -> torch.Tensor:
        """``R``'s diagonal blocks, ``(blocks, block_size, block_size)``, in the parameter's dtype."""
        if self.coft:
            # as PEFT: the constraint is a projection of the stored parameter, not part of the graph
            with torch.no_grad():
                self.weight.copy_(constrained(self.weight, self.block_size, self.eps))
        upper = self.weight
        # the Cayley transform in at least float32 (CPUs have no half-precision solve)
        compute = torch.promote_types(upper.dtype, torch.float32)
        rotation = cayley(skew_symmetric(upper.to(compute), self.block_size), self.neumann_terms)
        rotation = rotation.to(upper.dtype)
        return rotation.expand(self.blocks, -1, -1) if self.block_share else rotation

    def matrix(self) -> torch.Tensor:
        """The whole block-diagonal ``R``, ``(in_features, in_features)``."""
        return torch.block_diag(*self.blocks_of_r().unbind(0))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` on the last dimension, without forming the dense ``R``."""
        rotation = self.blocks_of_r()
        grouped = x.to(rotation.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", grouped, rotation)
        return rotated.reshape(x.shape).to(x.dtype)


class OFTLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("oft_R",)
    adapter_state_names: ClassVar[tuple[str, ...]] = ()
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR,)

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.oft_R = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: OFTConfig, module_name: str) -> None:
        blocks, block_size = self._block_layout(config, module_name)
        self.oft_R[adapter_name] = OFTRotation(blocks, block_size, config)
        self._move_to_base(self.oft_R[adapter_name], float_dtype=torch.float32)

    def _block_layout(self, config: OFTConfig, module_name: str) -> tuple[int, int]:
        """(number of blocks, block size) for this layer's input, adjusted as PEFT does where they do not divide it."""
        features = self.features.in_features
        if config.oft_block_size:
            size = nearest_divisor(features, config.oft_block_size)
            if size != config.oft_block_size:
                warnings.warn(
                    f"OFT: oft_block_size={config.oft_block_size} does not divide the {features} input features "
                    f"of {module_name!r}; using oft_block_size={size} there (as PEFT does)",
                    stacklevel=2,
                )
            return features // size, size
        blocks = nearest_divisor(features, config.r)
        if blocks != config.r:
            warnings.warn(
                f"OFT: r={config.r} does not divide the {features} input features of {module_name!r}; "
                f"using r={blocks} there (as PEFT does)",
                stacklevel=2,
            )
        return blocks, features // blocks

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self.base_layer(self._rotate_rows(x), *args, **kwargs)
        # as PEFT: each active, unmerged adapter's rotation in turn
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                x = self.oft_R[name].rotate(x)
        return self.base_layer(x, *args, **kwargs)

    def _rotate_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed batch: each row rotated by its own adapter's ``R`` (one pass per adapter in the batch)."""
        rows = self.row_adapters
        rows.check_rows(x.shape[0], type(self).__name__)
        out = x
        for name in rows.adapters():
            if name not in self.oft_R:
                continue
            selected = torch.tensor([row_name == name for row_name in rows.names], device=x.device)
            out = out.index_put((selected,), self.oft_R[name].rotate(x[selected]))
        return out

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        raise NotImplementedError(
            "OFT rotates the layer's input: OFTLayer.forward applies it before the base layer"
        )

    # --- merging ----------------------------------------------------------------------------------
    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W Rᵀ``: the base layer then computes ``(x R) Wᵀ``."""
        rotation = self.oft_R[adapter_name].matrix().detach().to(weight.device)
        compute = torch.promote_types(weight.dtype, rotation.dtype)
        return (weight.to(compute) @ rotation.to(compute).T).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W' (Rᵀ)⁻¹``, solved in float64; the core's merge residual then restores the exact original."""
        rotation = self.oft_R[adapter_name].matrix().detach().to(weight.device, torch.float64)
        # X Rᵀ = W'
        restored = torch.linalg.solve(rotation.T, weight.to(torch.float64), left=False)
        return restored.to(weight.dtype)
