"""The LoHa layer: ΔW = s · (W1a W1b) ⊙ (W2a W2b), s = alpha / r (FedPara's low-rank Hadamard product).

Layout, as PEFT stores it: for a Linear layer, and for a convolution without the effective decomposition,
ΔW is an ``out × (in/groups · kernel)`` matrix reshaped to the weight's shape; ``W1a``, ``W2a`` are
``out × r`` and ``W1b``, ``W2b`` are ``r × (in/groups · kernel)``. With ``use_effective_conv2d`` on a
convolution whose kernel is larger than 1, each Hadamard operand is a Tucker product instead,
``Wk[p, q, ·] = Σ_ij Wka[i, p] · tk[i, j, ·] · Wkb[j, q]``, with a core ``tk`` of ``r × r × kernel``,
``Wka`` of ``r × out`` and ``Wkb`` of ``r × in/groups`` (FedPara's "Proposition 3"; Conv1d's core has a
trailing kernel dimension of 1).

The forward pass forms ΔW only where that is cheaper. A Hadamard product of two rank-r matrices has
rank r²: ``(W1a W1b) ⊙ (W2a W2b) = U V`` with the row-wise Khatri-Rao products ``U[:, (i, j)] =
W1a[:, i] · W2a[:, j]`` (``out × r²``) and ``V[(i, j), :] = W1b[i, :] · W2b[j, :]`` (``r² × in``), so
``ΔW x = s · U (V x)`` costs ``r² · (in + out)`` per position instead of ``in · out``. The effective
decomposition adds the core ``T[(i, i'), (j, j'), ·] = t1[i, j, ·] · t2[i', j', ·]`` between them.

Training: ``module_dropout`` skips the whole adapter for a forward pass with that probability, and
``rank_dropout`` zeroes output rows of ΔW and rescales the kept ones by the inverse of the fraction
kept, drawing from torch's global generator in PEFT's order, so seeded runs match PEFT's.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from peftkit import AdapterLayer
from peftkit.composition import TOKEN_WISE_BLOCKS
from peftkit.layer_access import CONV1D, CONV2D, LINEAR
from torch import nn

from peftkit_loha.config import LoHaConfig

_CONV_FN = {CONV1D: F.conv1d, CONV2D: F.conv2d}


def pattern_value(patterns: dict, module_path: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def khatri_rao_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n, r), (n, r) → (n, r²)``: column ``(i, j)`` is ``a[:, i] · b[:, j]``."""
    return (a[:, :, None] * b[:, None, :]).flatten(1)


def khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(r, m), (r, m) → (r², m)``: row ``(i, j)`` is ``a[i] · b[j]``."""
    return (a[:, None] * b[None, :]).flatten(0, 1)


def kronecker_core(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """``(r, r, *k) × 2 → (r², r², *k)``: entry ``((i, i'), (j, j'))`` is ``t1[i, j] · t2[i', j']``."""
    return (t1[:, None, :, None] * t2[None, :, None, :]).flatten(2, 3).flatten(0, 1)


def tucker(core: torch.Tensor, w_out: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
    """``(r, r, *k), (r, out), (r, in) → (out, in, *k)``: the core with both rank modes expanded."""
    return torch.einsum("ij...,ip,jq->pq...", core, w_out, w_in)


class LoHaLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = (
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
    )
    adapter_state_names: ClassVar[tuple[str, ...]] = (
        "r",
        "alpha",
        "scaling",
        "rank_dropout",
        "module_dropout",
    )
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, CONV2D)
    composition_blocks: ClassVar[tuple[str, ...]] = TOKEN_WISE_BLOCKS

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        for name in self.adapter_tensor_names:
            setattr(self, name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.groups: int = getattr(self.get_base_layer(), "groups", 1)

    # --- shapes ---------------------------------------------------------------------------------
    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.features.kernel_size if self.features.kind != LINEAR else ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        f = self.features
        return (f.out_features, f.in_features // self.groups, *self.kernel_size)

    def uses_core(self, adapter_name: str) -> bool:
        return adapter_name in self.hada_t1

    # --- creating -------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoHaConfig, module_name: str) -> None:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout

        out, in_per_group = self.weight_shape[:2]
        kernel = self.kernel_size
        # PEFT skips the decomposition for 1 × 1 kernels, which are plain matrices anyway
        if config.use_effective_conv2d and math.prod(kernel) > 1:
            core_shape = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            self.hada_t1[adapter_name] = nn.Parameter(torch.empty(core_shape))
            self.hada_t2[adapter_name] = nn.Parameter(torch.empty(core_shape))
            a_shape, b_shape = (r, out), (r, in_per_group)
        else:
            a_shape, b_shape = (out, r), (r, in_per_group * math.prod(kernel))
        for a, b in ((self.hada_w1_a, self.hada_w1_b), (self.hada_w2_a, self.hada_w2_b)):
            a[adapter_name] = nn.Parameter(torch.empty(a_shape))
            b[adapter_name] = nn.Parameter(torch.empty(b_shape))
        self._init(adapter_name, identity=config.init_weights)
        self._move_to_base(*(p for _, p in self.adapter_parameters(adapter_name)), float_dtype=torch.float32)

    def _init(self, adapter_name: str, identity: bool) -> None:
        """He (Kaiming-uniform) init as FedPara proposes, in PEFT's order (so one seed gives PEFT's tensors);
        W2b at zero makes the adapter start as a no-op."""
        for name, param in self.adapter_parameters(adapter_name):
            if identity and name == "hada_w2_b":
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    # --- the math -------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.hadamard(adapter_name) * self.scaling[adapter_name]

    def hadamard(self, adapter_name: str) -> torch.Tensor:
        """``(W1a W1b) ⊙ (W2a W2b)`` (or its Tucker form), unscaled, in the base weight's shape."""
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if self.uses_core(adapter_name):
            t1, t2 = self.hada_t1[adapter_name], self.hada_t2[adapter_name]
            hadamard = tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)
        else:
            hadamard = (w1a @ w1b) * (w2a @ w2b)
        return hadamard.reshape(self.weight_shape)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(U, T, V)`` with ``ΔW = s · U T V`` (T None without the effective decomposition).

        U is ``out × r²``; V is ``r² × in/groups · kernel`` (or ``r² × in/groups`` with a core);
        T is ``r² × r² × kernel``.
        """
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if not self.uses_core(adapter_name):
            return khatri_rao_columns(w1a, w2a), None, khatri_rao_rows(w1b, w2b)
        core = kronecker_core(self.hada_t1[adapter_name], self.hada_t2[adapter_name])
        if self.features.kind == CONV1D:
            core = core[..., 0]
        return khatri_rao_columns(w1a.T, w2a.T), core, khatri_rao_rows(w1b, w2b)

    def forms_delta(self, adapter_name: str) -> bool:
        """True where forming ΔW costs no more multiply-adds per output position than the rank-r² factors."""
        out, in_per_group = self.weight_shape[:2]
        kernel, rank2 = math.prod(self.kernel_size), self.r[adapter_name] ** 2
        dense = out * in_per_group * kernel
        if self.uses_core(adapter_name):
            factored = rank2 * in_per_group * self.groups + self.groups * rank2 * rank2 * kernel + rank2 * out
        else:
            factored = rank2 * in_per_group * self.groups * kernel + rank2 * out
        return factored >= dense

    # --- the forward pass -----------------------------------------------------------------------
    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        total = result
        for name in adapter_names:
            kept = None
            if self.training:
                # PEFT draws the module-dropout number on every training forward, whatever the probability
                kept = torch.rand(1) > self.module_dropout[name]
                if not torch.compiler.is_compiling() and not kept:
                    continue  # compiled, a branch on a drawn number would break the graph: masked below
            delta = self.adapter_delta_output(x, name)
            if kept is not None and torch.compiler.is_compiling():
                delta = delta * kept.to(delta.device)
            # added in the adapter's dtype (float32), then cast back once, as PEFT does
            total = total + delta
        return total.to(result.dtype)

    def row_scales(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        """``s`` for each output row, times rank dropout's mask scaled by 1 / (fraction kept) in training."""
        scaling, p = self.scaling[adapter_name], self.rank_dropout[adapter_name]
        out = self.features.out_features
        if not (self.training and p):
            return torch.full((out,), scaling, device=device)
        keep = (torch.rand(out) > p).float()
        # PEFT divides by the mean as is (NaN when every row drops); a floor of 1/out changes nothing else
        keep = keep / keep.mean().clamp_min(1.0 / out)
        return (keep * scaling).to(device)

    def adapter_delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """ΔW applied to x, in the adapter's dtype, without the base layer's bias."""
        w1a = self.hada_w1_a[adapter_name]
        x = x.to(w1a.dtype)
        rows = self.row_scales(adapter_name, w1a.device)
        if self.forms_delta(adapter_name):
            hadamard = self.hadamard(adapter_name)
            delta = hadamard * rows.view(-1, *[1] * (hadamard.dim() - 1))
            if self.features.kind == LINEAR:
                return F.linear(x, delta)
            return self._conv(x, delta, spatial=True, groups=self.groups)
        up, core, down = self.factors(adapter_name)
        up = up * rows[:, None]
        if self.features.kind == LINEAR:
            return F.linear(F.linear(x, down), up)
        return self._conv_factored(x, up, core, down)

    def _conv_factored(
        self, x: torch.Tensor, up: torch.Tensor, core: torch.Tensor | None, down: torch.Tensor
    ) -> torch.Tensor:
        """``U (T (V x))`` as convolutions; each group of input channels goes through its own copy of V
        (and T), and U maps each group's r² features to that group's output channels."""
        kernel, groups = self.kernel_size, self.groups
        ones = (1,) * len(kernel)
        if core is None:
            down = down.reshape(-1, self.weight_shape[1], *kernel)
            h = self._conv(x, down.repeat(groups, *[1] * (down.dim() - 1)), spatial=True, groups=groups)
        else:
            down = down.reshape(*down.shape, *ones)
            h = self._conv(x, down.repeat(groups, *[1] * (down.dim() - 1)), spatial=False, groups=groups)
            h = self._conv(h, core.repeat(groups, *[1] * (core.dim() - 1)), spatial=True, groups=groups)
        return self._conv(h, up.reshape(*up.shape, *ones), spatial=False, groups=groups)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, spatial: bool, groups: int) -> torch.Tensor:
        """A convolution with the base layer's stride, padding and dilation (``spatial``) or a pointwise one."""
        conv = _CONV_FN[self.features.kind]
        if not spatial:
            return conv(x, weight, groups=groups)
        f = self.features
        return conv(x, weight, stride=f.stride, padding=f.padding, dilation=f.dilation, groups=groups)
