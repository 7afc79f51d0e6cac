"""The LoKr layer: ΔW = (alpha / r) · kron(W1, W2), reshaped to the base weight's shape.

A weight of shape ``(out, in / groups, *kernel)`` has its sizes split as ``out = a · c`` and
``in / groups = b · d`` (:func:`factorization`). ``W1`` is ``a × b``; ``W2`` is ``c × d`` (times the kernel
for convolutions). Each is kept full, or built from rank-``r`` factors when ``r`` is small against it::

    W1 = lokr_w1   or  lokr_w1_a @ lokr_w1_b                  (factored only with decompose_both)
    W2 = lokr_w2   or  lokr_w2_a @ lokr_w2_b                  (a conv's lokr_w2_b has d · kernel columns)
                   or  lokr_t2 ×₁ lokr_w2_aᵀ ×₂ lokr_w2_bᵀ   (use_effective_conv2d, kernel larger than 1)

A Conv1d's full ``W2`` (``c × d × k``) is combined as PEFT 0.21 combines it, by ``torch.kron`` of a 2-d and
a 3-d tensor (see :func:`_kron_as_peft_conv1d`), so that saved adapters mean the same in both libraries.

At init ``W1`` is zero (``init_weights=True``) or ``W2`` is (``"lycoris"``), so ΔW starts at zero.

A linear layer applies the product without forming ΔW: with ``x`` cut into ``b`` blocks of ``d``
(a ``b × d`` matrix ``X``), ``ΔW x = vec(W1 X W2ᵀ)``. A convolution forms its (kernel-sized) ΔW and
convolves with it. In training, ``rank_dropout`` zeroes random output rows of ΔW (divided by the kept
fraction with ``rank_dropout_scale``) and ``module_dropout`` skips the whole adapter for one pass; both
draw from torch's global generator in PEFT's order, so a seeded run drops what PEFT's drops.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from peftkit import AdapterLayer, TargetModulesError
from peftkit.composition import TOKEN_WISE_BLOCKS
from peftkit.layer_access import CONV1D, CONV2D, LINEAR
from torch import nn

from peftkit_lokr.config import LoKrConfig

_CONV_FN = {CONV1D: F.conv1d, CONV2D: F.conv2d}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into two factors, as PEFT (after LyCORIS) does.

    A ``factor`` > 0 that divides ``dimension`` is used as the first factor as it is. Otherwise the first
    factor is the largest divisor not above the square root (and not above ``factor`` when one is
    given), and the pair comes smaller first: ``128 → (8, 16)``, ``127 → (1, 127)``, ``(128, 4) → (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = math.isqrt(dimension) if factor == -1 else min(factor, math.isqrt(dimension))
    smaller = max(m for m in range(1, bound + 1) if dimension % m == 0)
    return smaller, dimension // smaller


@dataclass(frozen=True)
class KronShape:
    """How one weight splits into ``W1`` (``w1_rows × w1_cols``) and ``W2`` (``w2_rows × w2_cols × kernel``)."""

    w1_rows: int
    w1_cols: int
    w2_rows: int
    w2_cols: int
    kernel: tuple[int, ...]
    full_w1: bool
    full_w2: bool
    cp_w2: bool  # W2 in the CP form with lokr_t2 ("effective conv2d")

    @classmethod
    def of(
        cls, out_size: int, in_size: int, kernel: tuple[int, ...], r: int, config: LoKrConfig
    ) -> KronShape:
        w1_rows, w2_rows = factorization(out_size, config.decompose_factor)
        w1_cols, w2_cols = factorization(in_size, config.decompose_factor)
        # PEFT's rule: a factor is kept full unless r is below half its larger side
        full_w1 = not (config.decompose_both and r < max(w1_rows, w1_cols) / 2)
        full_w2 = r >= max(w2_rows, w2_cols) / 2
        cp_w2 = config.use_effective_conv2d and not full_w2 and any(k != 1 for k in kernel)
        return cls(w1_rows, w1_cols, w2_rows, w2_cols, tuple(kernel), full_w1, full_w2, cp_w2)


def cp_weight(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """The Tucker/CP rebuild of W2: ``core`` (r, r, k1, k2) with its two rank modes mapped to c and d."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, out_factor, in_factor)


def kron_weight(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(W1, W2) over the two matrix dimensions; a conv kernel W2 keeps its kernel dimensions.

    Block ``(i, j)`` of the result is ``W1[i, j] · W2``. Written as a broadcast product rather than with
    ``torch.kron``, which fails on the oddly strided W2 that the CP rebuild gives at r = 1.
    """
    if w2.dim() == 3:
        return _kron_as_peft_conv1d(w1, w2)
    rows1, cols1 = w1.shape
    rows2, cols2, *kernel = w2.shape
    ones = [1] * len(kernel)
    blocks = w1.reshape(rows1, 1, cols1, 1, *ones) * w2.reshape(1, rows2, 1, cols2, *kernel)
    return blocks.reshape(rows1 * rows2, cols1 * cols2, *kernel)


def kron_apply(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``kron(W1, W2) x`` over the last dimension of ``x``, without forming the product: each row of ``x``
    cut into a ``b × d`` block ``X`` gives ``vec(W1 X W2ᵀ)`` (``a · c`` values).

    ``X W2ᵀ`` is one ``mm`` over every block (a view of ``x``, no copy), then ``W1`` multiplies each
    result in one ``bmm`` against ``W1`` broadcast, never copied. Both are called explicitly:
    ``torch.matmul(W1, batch)`` would choose its kernel by whether ``W1`` *requires grad* (one folded
    ``mm`` then, a broadcast ``bmm`` otherwise, even under ``no_grad``), and the two sum in different
    orders, so a trained adapter and the same adapter loaded frozen would differ in the last bit.
    """
    (a, b), (c, d) = w1.shape, w2.shape
    right = (x.reshape(-1, d) @ w2.T).view(-1, b, c)  # (n, b, c): X W2ᵀ for every block X
    out = torch.bmm(w1.expand(right.shape[0], a, b), right)  # (n, a, c): W1 X W2ᵀ
    return out.view(*x.shape[:-1], a * c)


def _kron_as_peft_conv1d(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """What PEFT 0.21 makes of a Conv1d's full W2 (c × d × k): ``torch.kron(W1, W2)``, which takes W1 as
    1 × a × b, so the result is c × (a·d) × (b·k); the layer then reshapes it to the weight's shape.

    This is not a Kronecker product over the channels, but it is what PEFT's saved tensors mean, so it
    is reproduced here: an adapter gives the same ΔW in both libraries.
    """
    rows1, cols1 = w1.shape
    rows2, cols2, width = w2.shape
    blocks = w1.reshape(1, rows1, 1, cols1, 1) * w2.reshape(rows2, 1, cols2, 1, width)
    return blocks.reshape(rows2, rows1 * cols2, cols1 * width)


def pattern_value(patterns: dict, module_path: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


class LoKrLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    )
    adapter_state_names: ClassVar[tuple[str, ...]] = (
        "r",
        "alpha",
        "scaling",
        "rank_dropout",
        "rank_dropout_scale",
        "module_dropout",
    )
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, CONV2D)
    composition_blocks: ClassVar[tuple[str, ...]] = TOKEN_WISE_BLOCKS

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        if self.features.fan_in_fan_out:
            raise TargetModulesError(
                f"LoKr cannot adapt a {type(self.get_base_layer()).__name__} layer (transformers' Conv1D, "
                "as in GPT-2): PEFT 0.21's LoKr adapts nn.Linear, nn.Conv1d and nn.Conv2d only, and "
                "peftkit-lokr keeps its adapters loadable there"
            )
        for name in self.adapter_tensor_names:
            setattr(self, name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    @property
    def groups(self) -> int:
        return getattr(self.get_base_layer(), "groups", 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        f = self.features
        return (f.out_features, f.in_features // self.groups, *f.kernel_size)

    # --- creating -------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoKrConfig, module_name: str) -> None:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale
        self.module_dropout[adapter_name] = config.module_dropout

        out_size, in_size, *kernel = self.weight_shape
        shape = KronShape.of(out_size, in_size, tuple(kernel), r, config)
        for name, size in self._tensor_sizes(shape, r).items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(size))
        self._init(adapter_name, config.init_weights)
        self._move_to_base(*(p for _, p in self.adapter_parameters(adapter_name)), float_dtype=torch.float32)

    @staticmethod
    def _tensor_sizes(shape: KronShape, r: int) -> dict[str, tuple[int, ...]]:
        """PEFT's tensor names and layouts for this split."""
        s = shape
        sizes: dict[str, tuple[int, ...]] = {}
        if s.full_w1:
            sizes["lokr_w1"] = (s.w1_rows, s.w1_cols)
        else:
            sizes["lokr_w1_a"], sizes["lokr_w1_b"] = (s.w1_rows, r), (r, s.w1_cols)
        if s.full_w2:
            sizes["lokr_w2"] = (s.w2_rows, s.w2_cols, *s.kernel)
        elif s.cp_w2:
            # a 1-d kernel k is stored as (k, 1), as PEFT stores it
            core_kernel = s.kernel if len(s.kernel) == 2 else (*s.kernel, 1)
            sizes["lokr_t2"] = (r, r, *core_kernel)
            sizes["lokr_w2_a"], sizes["lokr_w2_b"] = (r, s.w2_rows), (r, s.w2_cols)
        else:
            sizes["lokr_w2_a"] = (s.w2_rows, r)
            sizes["lokr_w2_b"] = (r, s.w2_cols * math.prod(s.kernel))
        return sizes

    def _init(self, adapter_name: str, init_weights: bool | str) -> None:
        params = dict(self.adapter_parameters(adapter_name))
        for param in params.values():
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if init_weights is True:  # W1 = 0
            nn.init.zeros_(params.get("lokr_w1", params.get("lokr_w1_a")))
        elif init_weights == "lycoris":  # W2 = 0
            nn.init.zeros_(params.get("lokr_w2", params.get("lokr_w2_b")))
        # False: every factor random, so the adapter acts from the start (for tests)

    # --- the math ------------------------------------------------------------------------------
    def w1(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            return self.lokr_w1[adapter_name]
        return self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def w2(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w2:
            return self.lokr_w2[adapter_name]
        if adapter_name in self.lokr_t2:
            return cp_weight(
                self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name]
            )
        return self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = kron_weight(self.w1(adapter_name), self.w2(adapter_name)) * self.scaling[adapter_name]
        return delta.reshape(self.weight_shape)

    def _rank_dropout_mask(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        """1 for each output row of ΔW that is kept, 0 for each dropped (over the kept mean when scaled)."""
        # drawn on the CPU as PEFT draws it, so a seeded run drops the same rows
        keep = (torch.rand(self.features.out_features) > self.rank_dropout[adapter_name]).float()
        if self.rank_dropout_scale[adapter_name]:
            keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)  # all dropped stays 0, not NaN
        return keep.to(device)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        for name in adapter_names:
            kept = None
            if self.training:
                # PEFT draws this number in every training pass, dropout or not: keep the generator in step
                kept = torch.rand(1) > self.module_dropout[name]
                if not torch.compiler.is_compiling() and not kept:
                    continue  # compiled, a branch on a drawn number would break the graph: masked below
            h = x.to(self.adapter_parameters(name)[0][1].dtype)
            delta = self._linear_delta(name, h) if self.features.kind == LINEAR else self._conv_delta(name, h)
            if kept is not None and torch.compiler.is_compiling():
                delta = delta * kept.to(delta.device)
            result = result + delta.to(result.dtype)
        return result

    def _drops_ranks(self, adapter_name: str) -> bool:
        return self.training and self.rank_dropout[adapter_name] > 0

    def _linear_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.w1(adapter_name), self.w2(adapter_name)
        out = kron_apply(w1, w2, x) * self.scaling[adapter_name]
        if self._drops_ranks(adapter_name):
            out = out * self._rank_dropout_mask(adapter_name, out.device)
        return out

    def _conv_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        weight = self.delta_weight(adapter_name)
        if self._drops_ranks(adapter_name):
            mask = self._rank_dropout_mask(adapter_name, weight.device)
            weight = weight * mask.view(-1, *[1] * (weight.dim() - 1))
        f = self.features
        return _CONV_FN[f.kind](x, weight, None, f.stride, f.padding, f.dilation, self.groups)
