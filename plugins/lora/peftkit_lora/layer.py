"""The LoRA layer: ΔW = scaling · B A, added to the base output as scaling · B(A(dropout(x))).

With DoRA (``use_dora``) the layer computes m / ‖W + ΔW‖ · (W + ΔW) x instead: see :mod:`peftkit_lora.dora`.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from peftkit import AdapterLayer, plugins
from peftkit.layer_access import CONV1D, CONV2D, CONV3D, EMBEDDING, LINEAR
from torch import nn

from peftkit_lora import dora, fused
from peftkit_lora.config import LoraConfig
from peftkit_lora.init import olora_factors, pissa_factors, uses_base_weight

_CONV = {CONV1D: (nn.Conv1d, F.conv1d), CONV2D: (nn.Conv2d, F.conv2d), CONV3D: (nn.Conv3d, F.conv3d)}


def pattern_value(patterns: dict, module_path: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _has_forward_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as module_hooks

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
    )


class LoraLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )
    adapter_state_names: ClassVar[tuple[str, ...]] = (
        "lora_dropout",
        "r",
        "lora_alpha",
        "scaling",
        "merged_norms",
    )
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, CONV2D, CONV3D, EMBEDDING)
    # a hot-swapped adapter may differ in these: they only set ``scaling`` (see update_scalars)
    hotswap_fields: ClassVar[tuple[str, ...]] = ("lora_alpha", "alpha_pattern", "use_rslora")
    # LoRA on a linear layer runs as one autograd node (peftkit_lora.fused); tests switch it off to
    # compare with the plain modules
    use_fused_linear: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, one per output feature
        self.lora_dropout = nn.ModuleDict()
        self._stack_cache = None  # mixed batches: the stacked A and s·B and what they were made from
        self._plan_cache = None  # mixed batches: which adapters of the batch this layer runs, and how
        self.merged_norms: dict[str, torch.Tensor] = {}  # DoRA: ‖W + ΔW‖ at merge time, to unmerge exactly
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
        self._move_to_base(*(p for _, p in self.adapter_parameters(adapter_name)), float_dtype=torch.float32)
        if uses_base_weight(config.init_lora_weights):
            self._init_from_base_weight(adapter_name, config.init_lora_weights)
        else:
            self._init(adapter_name, config.init_lora_weights)
        if config.use_dora:
            weight = self._rows(plugins.read_weight(self.get_base_layer()))
            norms = dora.row_norms(weight, *self._factors(adapter_name), self.scaling[adapter_name])
            if f.kind in _CONV:  # PEFT keeps a convolution's magnitude shaped (1, out, 1, ...)
                norms = norms.view(1, -1, *([1] * len(f.kernel_size)))
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norms)

    def update_scalars(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        """After a hot-swap: alpha and scaling from the new config; the rank is the layer's, unchanged."""
        r = self.r[adapter_name]
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / (math.sqrt(r) if config.use_rslora else r)

    def _init_from_base_weight(self, adapter_name: str, init: str) -> None:
        """PiSSA / OLoRA: the adapter takes the top of W, the base layer keeps the residual."""
        if self.features.kind != LINEAR:
            raise ValueError(
                f"init_lora_weights={init!r} needs a linear layer, not a {self.features.kind} one"
            )
        base = self.get_base_layer()
        weight = plugins.read_weight(base).detach().float()
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if init == "olora":
            a, b = olora_factors(weight, r)
        else:
            a, b = pissa_factors(weight, r, scaling, init)
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(a)
            self.lora_B[adapter_name].weight.copy_(b)
        plugins.write_weight(base, weight - scaling * (b @ a))

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as 2-D matrices, ``(r, K)`` and ``(out, r)``, in the row layout of :meth:`_rows`."""
        if self.features.kind == EMBEDDING:
            return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return a.flatten(1), b.flatten(1)

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A dense weight as one row per output feature (an embedding's output features are its columns)."""
        return weight.T if self.features.kind == EMBEDDING else weight.flatten(1)

    def _feature_view(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector shaped to broadcast against a layer output (channels on dim 1 for conv)."""
        if self.features.kind in _CONV:
            return vector.view(1, -1, *([1] * (like.dim() - 2)))
        return vector

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
        base_result = result
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
                lora = (after_a @ b.T) * self.scaling[name]
                h = None
            elif self._fuses(name, x):
                result = fused.lora_linear(
                    result,
                    x,
                    self.lora_A[name].weight,
                    self.lora_B[name].weight,
                    self.scaling[name],
                    self._dropout_p(name),
                )
                continue
            else:
                a, b = self.lora_A[name], self.lora_B[name]
                h = self.lora_dropout[name](x.to(a.weight.dtype))
                lora = b(a(h)) * self.scaling[name]
            if name in self.lora_magnitude_vector:
                result = result + self._dora_output(name, h, base_result, lora).to(out_dtype)
            else:
                result = result + lora.to(out_dtype)
        return result

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._fuses_with_base(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return fused.linear_with_lora(
            x,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            self._dropout_p(name),
        )

    def _fuses_with_base(self, x: torch.Tensor) -> str | None:
        """The one pending adapter, where its node can compute the base output too: the base is a bare
        ``nn.Linear`` (no hooks that its own call would run) with a frozen weight, and one dtype throughout
        (or autocast on, which casts every input to its dtype)."""
        if self.disabled or self.row_adapters is not None or not self.use_fused_linear:
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or base.weight.requires_grad or _has_forward_hooks(base):
            return None
        pending = [name for name in self.active_adapters if name not in self.merged_adapters]
        if len(pending) != 1 or not self._fuses(pending[0], x, base.weight):
            return None
        return pending[0]

    def mixed_batch_output(self, x: torch.Tensor, result: torch.Tensor, rows) -> torch.Tensor:
        """Every row's own adapter at once: two ``bmm`` over the tokens grouped by adapter, against the
        adapters' stacked A and B (scale folded into B), so each adapter's weights are read once."""
        held, grouped_path = self._mixed_batch_plan(rows)
        if not grouped_path:
            return super().mixed_batch_output(x, result, rows)
        if not held:
            return result
        if self.training and any(self._dropout_p(name) for name in held):
            raise ValueError(
                "a mixed batch (adapter_names=...) runs LoRA without dropout: call model.eval(), or train "
                "with lora_dropout=0"
            )
        lora_a, lora_b = self._stacked(held)
        rows_x = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
        grouping = rows.grouping(held, rows_x.shape[0] // x.shape[0], x.device)
        padded_x = torch.cat([rows_x, rows_x.new_zeros(1, rows_x.shape[-1])])
        grouped = padded_x.index_select(0, grouping.gather).view(grouping.adapters, grouping.width, -1)
        update = torch.bmm(torch.bmm(grouped, lora_a), lora_b)
        update = update.view(-1, update.shape[-1])
        padded_update = torch.cat([update, update.new_zeros(1, update.shape[-1])])
        flat = result.reshape(-1, result.shape[-1])
        return (flat + padded_update.index_select(0, grouping.scatter).to(flat.dtype)).view(result.shape)

    def _mixed_batch_plan(self, rows) -> tuple[tuple[str, ...], bool]:
        """The adapters of the batch this layer holds, and whether the grouped path can run them (a
        linear layer, no DoRA); kept while the batch names the same adapters and the layer holds the same."""
        key = (tuple(rows.adapters()), tuple(self.lora_A.keys()), tuple(self.lora_magnitude_vector.keys()))
        if self._plan_cache is None or self._plan_cache[0] != key:
            held = tuple(name for name in key[0] if name in key[1])
            grouped_path = self.features.kind == LINEAR and not set(held) & set(key[2])
            self._plan_cache = (key, held, grouped_path)
        return self._plan_cache[1], self._plan_cache[2]

    def _stacked(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Aᵀ as ``(adapters, in, r)`` and (s·B)ᵀ as ``(adapters, r, out)``, ranks zero-padded to the largest.

        Kept between calls while no gradient is taken and no tensor or scale has changed (a tensor
        changed in place, by an optimizer or a load, bumps its version)."""
        cached = self._stack_cache
        if cached is not None and cached[0] == (names, [self.scaling[name] for name in names]):
            tensors, stamp, stacks = cached[1:]
            if stamp == [t._version for t in tensors]:
                return stacks
        tensors = [t for name in names for t in (self.lora_A[name].weight, self.lora_B[name].weight)]
        rank = max(self.r[name] for name in names)
        a_rows = [F.pad(a, (0, 0, 0, rank - a.shape[0])) for a in tensors[0::2]]
        b_cols = [F.pad(b * self.scaling[name], (0, rank - b.shape[1])) for name, b in zip(names, tensors[1::2])]
        # laid out for x @ A then @ B: bmm reads them contiguously, with no transposed copy per call
        stacks = torch.stack(a_rows).transpose(1, 2).contiguous(), torch.stack(b_cols).transpose(1, 2).contiguous()
        if torch.is_grad_enabled() and any(t.requires_grad for t in stacks):
            self._stack_cache = None
        else:
            stamp = [t._version for t in tensors]
            self._stack_cache = ((names, [self.scaling[name] for name in names]), tensors, stamp, stacks)
        return stacks

    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def _fuses(self, name: str, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> bool:
        """Whether the fused node computes what the plain modules would: a linear layer, no DoRA, and a
        dtype the node can compute in (see :func:`peftkit_lora.fused.compute_dtype`; ``base_weight`` when
        the node is to compute the base output too)."""
        return (
            self.use_fused_linear
            and self.features.kind == LINEAR
            and name not in self.lora_magnitude_vector
            and fused.compute_dtype(x, self.lora_A[name].weight, base_weight) is not None
            # the node draws its dropout seed as a Python int, which torch.compile cannot trace: compiled,
            # the plain modules run, and the compiler keeps the dropout mask its own way
            and not (self._dropout_p(name) > 0 and torch.compiler.is_compiling())
        )

    def _dora_output(
        self,
        name: str,
        dropped: torch.Tensor | None,
        base_result: torch.Tensor,
        lora: torch.Tensor,
    ) -> torch.Tensor:
        """What DoRA adds to the base output: (m/‖W + ΔW‖ − 1) · W x + m/‖W + ΔW‖ · ΔW x.

        W x is the base layer's own output (less its bias) unless dropout changed the adapter's input,
        in which case the base weight is applied once more to the dropped input.
        """
        base = self.get_base_layer()
        weight = plugins.read_weight(base)
        norm = dora.row_norms(self._rows(weight), *self._factors(name), self.scaling[name])
        scale = self._feature_view(self.lora_magnitude_vector[name].flatten() / norm, lora)
        if dropped is None or not self.training or isinstance(self.lora_dropout[name], nn.Identity):
            plain = base_result
            bias = getattr(base, "bias", None)
            if isinstance(bias, torch.Tensor):
                plain = plain - self._feature_view(bias, plain)
        else:
            plain = self._apply_weight(dropped, weight.to(dropped.dtype))
        return (scale - 1) * plain.to(lora.dtype) + scale * lora

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's weight (no bias) applied to ``x``."""
        if self.features.kind == LINEAR:
            return F.linear(x, weight)
        base = self.get_base_layer()
        _, conv_fn = _CONV[self.features.kind]
        return conv_fn(x, weight, None, base.stride, base.padding, base.dilation, base.groups)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        scaling = self.scaling[adapter_name]
        if self.features.kind == EMBEDDING:
            return (self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]).T * scaling
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if self.features.kind == LINEAR:
            return (b @ a) * scaling
        _, conv_fn = _CONV[self.features.kind]
        return conv_fn(a.transpose(0, 1), b).transpose(0, 1) * scaling

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if adapter_name not in self.lora_magnitude_vector:
            return super().merged_weight(adapter_name, weight)
        combined = weight.float() + self.delta_weight(adapter_name).detach().float()
        norm = dora.dense_row_norms(self._rows(combined))
        self.merged_norms[adapter_name] = norm
        scale = self.lora_magnitude_vector[adapter_name].detach().flatten().float() / norm
        return self._scale_rows(combined, scale).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if adapter_name not in self.lora_magnitude_vector:
            return super().unmerged_weight(adapter_name, weight)
        norm = self.merged_norms[adapter_name]
        scale = self.lora_magnitude_vector[adapter_name].detach().flatten().float() / norm
        combined = self._scale_rows(weight.float(), 1 / scale)
        return (combined - self.delta_weight(adapter_name).detach().float()).to(weight.dtype)

    def _scale_rows(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Multiply each output feature's slice of a dense weight by its entry of ``scale``."""
        if self.features.kind == EMBEDDING:
            return weight * scale[None, :]
        return weight * scale.view(-1, *([1] * (weight.dim() - 1)))
