"""The LoRA layer: ΔW = scaling · B A, added to the base output as scaling · B(A(dropout(x))).

With DoRA (``use_dora``) the layer computes m / ‖W + ΔW‖ · (W + ΔW) x instead: see :mod:`peftkit_lora.dora`.

The forward pass reads its adapters as :class:`Adapter` tuples, kept up to date by every change of which
adapters run (``set_adapter``, merging, deleting, a hot-swap): on a linear or convolutional layer without
DoRA it looks up no adapter name, so a compiled forward does not guard on one. After
``prepare_model_for_compiled_hotswap`` (:meth:`LoraLayer.prepare_compiled_hotswap`) an adapter's A and B
hold ``target_rank`` rows and columns, the ones beyond its rank zero, and its scale is a 0-dim tensor
changed in place: adapters of any rank up to ``target_rank`` and any alpha then swap in, or switch with
``set_adapter``, without changing a shape or a guard.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from peftkit import AdapterLayer, AdapterLoadError, plugins
from peftkit.composition import TOKEN_WISE_BLOCKS
from peftkit.layer_access import CONV1D, CONV2D, CONV3D, EMBEDDING, LINEAR
from torch import nn

from peftkit_lora import dora, fused, siblings
from peftkit_lora.config import LoraConfig
from peftkit_lora.init import loftq_factors, olora_factors, pissa_factors, uses_base_weight

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


class Adapter(NamedTuple):
    """One adapter of a layer as the forward pass reads it.

    A and B are read from their modules at each call, never kept: FSDP2, ``torch.func.functional_call``
    and parametrizations put other tensors in those modules. The name is read only where tensors are
    looked up by name (an embedding's A and B, DoRA's magnitude), so a compiled forward of a linear or
    convolutional layer guards on no adapter name.
    """

    name: str
    lora_a: nn.Module | None  # A's module (linear or convolution); None on an embedding
    lora_b: nn.Module | None
    scaling: float | torch.Tensor  # a 0-dim tensor once prepared for compiled hot-swaps
    dropout: nn.Module
    dora: bool


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
        "target_rank",
    )
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, CONV2D, CONV3D, EMBEDDING)
    composition_blocks: ClassVar[tuple[str, ...]] = TOKEN_WISE_BLOCKS
    # a hot-swapped adapter may differ in these: they only set ``scaling`` (see update_scalars)
    hotswap_fields: ClassVar[tuple[str, ...]] = ("lora_alpha", "alpha_pattern", "use_rslora")
    # LoRA on a linear layer runs as one autograd node (peftkit_lora.fused); tests switch it off to
    # compare with the plain modules
    use_fused_linear: ClassVar[bool] = True
    # set to True to compute the down-projections of layers that read one input (q, k and v; gate and up)
    # as one product (peftkit_lora.siblings); off by default, as it measured no faster on CPU
    group_siblings: ClassVar[bool] = False

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
        self.scaling: dict[str, float | torch.Tensor] = {}
        # adapters prepared for compiled hot-swaps: the rank their A and B hold (r stays the adapter's own)
        self.target_rank: dict[str, int] = {}
        self._pending: tuple[Adapter, ...] = ()  # the active, unmerged adapters, in order: what forward runs

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
            self._init_from_base_weight(adapter_name, config.init_lora_weights, config.loftq_config)
        else:
            self._init(adapter_name, config.init_lora_weights)
        if config.use_dora:
            weight = self._rows(plugins.read_weight(self.get_base_layer()))
            norms = dora.row_norms(weight, *self._factors(adapter_name), self.scaling[adapter_name])
            if f.kind in _CONV:  # PEFT keeps a convolution's magnitude shaped (1, out, 1, ...)
                norms = norms.view(1, -1, *([1] * len(f.kernel_size)))
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norms)
        self._refresh_pending()

    def update_scalars(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        """After a hot-swap: alpha and scaling from the new config. The rank is the layer's, unchanged,
        unless the adapter was prepared for compiled hot-swaps: then it is the new adapter's (at most
        ``target_rank``). A tensor scale is written in place, so a compiled graph reading it stays valid."""
        if adapter_name in self.target_rank:
            self.r[adapter_name] = pattern_value(config.rank_pattern, module_name, config.r)
        r = self.r[adapter_name]
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.lora_alpha[adapter_name] = alpha
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        if isinstance(self.scaling[adapter_name], torch.Tensor):
            self.scaling[adapter_name].fill_(scaling)
        else:
            self.scaling[adapter_name] = scaling
            self._refresh_pending()

    def hotswap_fields_of(self, adapter_name: str) -> tuple[str, ...]:
        """Once prepared for compiled hot-swaps, the rank may differ too (up to ``target_rank``)."""
        if adapter_name in self.target_rank:
            return (*self.hotswap_fields, "r", "rank_pattern")
        return self.hotswap_fields

    # --- compiled hot-swaps ---------------------------------------------------------------------
    def held_rank(self, adapter_name: str) -> int:
        """The rank A and B hold: the adapter's rank, or ``target_rank`` once padded."""
        return self._factor_parameters(adapter_name)[0].shape[0]

    def prepare_compiled_hotswap(self, adapter_name: str, target_rank: int | None) -> None:
        """Pad A's rows and B's columns with zeros to ``target_rank`` (None: keep the rank held), and make the
        scale a 0-dim tensor on A's device. The adapter computes what it did; its parameters are new tensors
        in the same ``Parameter`` objects, so build an optimizer afterwards. Callers check the rank first."""
        held = self.held_rank(adapter_name)
        rank = held if target_rank is None else target_rank
        if rank < held:
            raise ValueError(f"cannot pad adapter {adapter_name!r} of rank {held} down to {rank}")
        a, b = self._factor_parameters(adapter_name)
        with torch.no_grad():
            a.data = torch.cat([a.data, a.new_zeros(rank - held, *a.shape[1:])])
            b.data = torch.cat([b.data, b.new_zeros(b.shape[0], rank - held, *b.shape[2:])], dim=1)
        if self.features.kind != EMBEDDING:  # keep the modules' sizes true to their weights
            _set_rank_size(self.lora_A[adapter_name], out=rank)
            _set_rank_size(self.lora_B[adapter_name], into=rank)
        scaling = self.scaling[adapter_name]
        if not isinstance(scaling, torch.Tensor):
            self.scaling[adapter_name] = torch.tensor(float(scaling), dtype=torch.float32, device=a.device)
        self.target_rank[adapter_name] = rank
        self._stack_cache = None
        self._refresh_pending()

    def saved_tensors(self, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
        """As the file holds them: a padded adapter's A and B cut back to its own rank, as PEFT expects."""
        tensors = self.adapter_parameters(adapter_name)
        if adapter_name not in self.target_rank:
            return tensors
        r = self.r[adapter_name]
        return [(name, _cut_rank(name, tensor, r)) for name, tensor in tensors]

    def tensor_to_load(self, adapter_name: str, name: str, saved: torch.Tensor) -> torch.Tensor:
        """A saved A or B of a padded adapter, padded with zeros to the rank the layer holds."""
        dim = _rank_dim(name)
        if adapter_name not in self.target_rank or dim is None or saved.dim() <= dim:
            return saved  # the loader's shape check speaks for a tensor of another form
        rank, held = saved.shape[dim], self.target_rank[adapter_name]
        if rank > held:
            raise AdapterLoadError(
                f"tensor {name!r} of adapter {adapter_name!r} has rank {rank}, above the rank {held} that "
                f"prepare_model_for_compiled_hotswap(target_rank={held}) padded this adapter to: prepare the "
                "model with a target_rank of at least the largest rank you will swap in"
            )
        padding = [0, 0] * (saved.dim() - 1 - dim) + [0, held - rank]
        return F.pad(saved, padding)

    def _init_from_base_weight(self, adapter_name: str, init: str, loftq: dict) -> None:
        """PiSSA / OLoRA: the adapter takes the top of W, the base layer keeps the residual. LoftQ: the
        base layer keeps W quantized, the adapter takes the top of what quantizing lost."""
        if self.features.kind != LINEAR:
            raise ValueError(
                f"init_lora_weights={init!r} needs a linear layer, not a {self.features.kind} one"
            )
        base = self.get_base_layer()
        if init == "loftq" and type(getattr(base, "weight", None)) is not nn.Parameter:
            raise ValueError(
                f"init_lora_weights='loftq' starts from the full-precision weight, but this layer's is "
                f"{type(base.weight).__name__}: apply LoftQ to the model before quantizing it, save that "
                "base model, and load the saved base in 4-bit or 8-bit"
            )
        weight = plugins.read_weight(base).detach().float()
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if init == "olora":
            a, b = olora_factors(weight, r)
        elif init == "loftq":
            a, b, base_weight = loftq_factors(weight, r, scaling, loftq["loftq_bits"], loftq["loftq_iter"])
        else:
            a, b = pissa_factors(weight, r, scaling, init)
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(a)
            self.lora_B[adapter_name].weight.copy_(b)
        if init != "loftq":
            base_weight = weight - scaling * (b @ a)
        plugins.write_weight(base, base_weight)

    def _factor_parameters(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """A and B as the layer holds them (a convolution's with their kernel dimensions)."""
        if self.features.kind == EMBEDDING:
            return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as 2-D matrices, ``(r, K)`` and ``(out, r)``, in the row layout of :meth:`_rows`."""
        a, b = self._factor_parameters(adapter_name)
        return a.flatten(1), b.flatten(1)

    def _adapter(self, adapter_name: str) -> Adapter:
        modules = (None, None) if self.features.kind == EMBEDDING else (self.lora_A, self.lora_B)
        return Adapter(
            adapter_name,
            *(container[adapter_name] if container is not None else None for container in modules),
            self.scaling[adapter_name],
            self.lora_dropout[adapter_name],
            adapter_name in self.lora_magnitude_vector,
        )

    def _factors_of(self, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's A and B as they are now."""
        if adapter.lora_a is None:
            return self.lora_embedding_A[adapter.name], self.lora_embedding_B[adapter.name]
        return adapter.lora_a.weight, adapter.lora_b.weight

    def _refresh_pending(self) -> None:
        self._pending = tuple(
            self._adapter(name) for name in self.active_adapters if name not in self.merged_adapters
        )

    # every change of which adapters run, or of what they hold, goes through one of these
    def set_active(self, adapter_names: list[str]) -> None:
        super().set_active(adapter_names)
        self._refresh_pending()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._stack_cache = self._plan_cache = None
        self._refresh_pending()

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        try:
            super().merge(adapter_names, safe_merge)
        finally:
            self._refresh_pending()

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        try:
            super().unmerge(adapter_names)
        finally:
            self._refresh_pending()

    def _apply(self, fn, recurse: bool = True):
        """Moving the layer (``.to(device)``) moves tensor scales with A: ``nn.Module`` does not hold them."""
        super()._apply(fn, recurse)
        for name, scaling in self.scaling.items():
            device = self._factor_parameters(name)[0].device
            if isinstance(scaling, torch.Tensor) and scaling.device != device:
                self.scaling[name] = scaling.to(device)
        self._stack_cache = None
        self._refresh_pending()
        return self

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A dense weight as one row per output feature (an embedding's output features are its columns)."""
        return weight.T if self.features.kind == EMBEDDING else weight.flatten(1)

    def _feature_view(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector shaped to broadcast against a layer output (channels on dim 1 for conv)."""
        if self.features.kind in _CONV:
            return vector.view(1, -1, *([1] * (like.dim() - 2)))
        return vector

    def _init(self, adapter_name: str, init: bool | str) -> None:
        if init == "corda" and self.features.kind != LINEAR:
            raise ValueError(
                f"init_lora_weights='corda' needs a linear layer, not a {self.features.kind} one: CorDA "
                "decomposes W·C, C the covariance of the layer's inputs; leave it out of target_modules"
            )
        if init is False:  # leave the random init: a non-identity adapter, as PEFT does for tests
            if adapter_name in self.lora_embedding_A:
                nn.init.normal_(self.lora_embedding_A[adapter_name])
                nn.init.normal_(self.lora_embedding_B[adapter_name])
            return
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
            return
        # EVA's and CorDA's A is kaiming's (B zero) until their data pass sets them
        if init is True or init in ("eva", "corda"):
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        return self._add_adapters(x, result, [self._adapter(name) for name in adapter_names])

    def _add_adapters(self, x: torch.Tensor, result: torch.Tensor, adapters) -> torch.Tensor:
        base_result = result
        out_dtype = result.dtype
        for adapter in adapters:
            a, b = self._factors_of(adapter)
            if self.features.kind == EMBEDDING:
                base = self.get_base_layer()
                after_a = F.embedding(
                    x,
                    a.T,
                    base.padding_idx,
                    base.max_norm,
                    base.norm_type,
                    base.scale_grad_by_freq,
                    base.sparse,
                )
                lora = (after_a @ b.T) * adapter.scaling
                h = None
            elif self._fuses(adapter, a, x):
                result = fused.lora_linear(result, x, a, b, adapter.scaling, self._dropout_p(adapter))
                continue
            else:
                h = adapter.dropout(x.to(a.dtype))
                lora = self._low_rank(h, a, b) * adapter.scaling
            if adapter.dora:
                # summed before rounding to the output's dtype: DoRA's term nearly cancels the base output
                # where the magnitude is far below the weight's norm, and rounding it first would keep
                # only the rounding error of that cancellation
                dora_term = self._dora_output(adapter, a, b, h, base_result, lora)
                result = (result.to(dora_term.dtype) + dora_term).to(out_dtype)
            else:
                result = result + lora.to(out_dtype)
        return result

    def _low_rank(self, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """B(A(h)), as the modules ``lora_A`` and ``lora_B`` compute it."""
        if self.features.kind == LINEAR:
            return F.linear(F.linear(h, a), b)
        _, conv_fn = _CONV[self.features.kind]
        return conv_fn(conv_fn(h, a, None, self.features.stride, self.features.padding), b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.row_adapters is not None or self.active_composition is not None:
            return super().forward(x, *args, **kwargs)
        pending = self._pending
        if len(pending) == 1 and not (args or kwargs):
            adapter = pending[0]
            a, b = self._factors_of(adapter)
            down = self._shared_down(x)
            if self._fuses_with_base(adapter, a, x):
                base = self.base_layer
                if down is not None:
                    return fused.linear_with_down(x, base.weight, base.bias, down, b, adapter.scaling)
                p = self._dropout_p(adapter)
                return fused.linear_with_lora(x, base.weight, base.bias, a, b, adapter.scaling, p)
            if down is not None:
                return fused.lora_up(self.base_layer(x), down, b, adapter.scaling)
        result = self.base_layer(x, *args, **kwargs)
        return self._add_adapters(x, result, pending) if pending else result

    def _shared_down(self, x: torch.Tensor) -> torch.Tensor | None:
        """This layer's down-projection from a product shared with its siblings (:mod:`peftkit_lora.siblings`),
        or None where it computes its own."""
        if not self.group_siblings or not siblings.may_group(x):
            return None
        groupable = self._groupable(x)
        if groupable is None:
            return None
        a, dtype = groupable
        return siblings.shared_down(self, a, x, dtype)

    def _groupable(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype] | None:
        """A and the dtype the fused node computes in, where this layer's down-projection for ``x`` may come
        from a product shared with its siblings: one unmerged adapter, run by the fused node, no dropout in
        effect, no hooks on the layer or its base (they may change the weights), no mixed batch or composition;
        else None."""
        if (
            not self.group_siblings
            or self.disabled
            or self.row_adapters is not None
            or self.active_composition is not None
            or len(self._pending) != 1
        ):
            return None
        adapter = self._pending[0]
        if adapter.lora_a is None or self._dropout_p(adapter) > 0:
            return None
        a = adapter.lora_a.weight
        if a.device != x.device or not self._fuses(adapter, a, x):
            return None
        if _has_forward_hooks(self) or _has_forward_hooks(self.base_layer):
            return None
        return a, fused.compute_dtype(x, a)

    def _fuses_with_base(self, adapter: Adapter, a: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether the adapter's node can compute the base output too: the base is a bare ``nn.Linear`` (no
        hooks that its own call would run) with a frozen weight, and one dtype throughout (or autocast on,
        which casts every input to its dtype)."""
        base = self.base_layer
        if type(base) is not nn.Linear or base.weight.requires_grad or _has_forward_hooks(base):
            return False
        return self._fuses(adapter, a, x, base.weight)

    def mixed_batch_output(self, x: torch.Tensor, result: torch.Tensor, rows) -> torch.Tensor:
        """Every row's own adapter at once, with two ``bmm`` against the adapters' stacked A and B (scale
        folded into B). Rows already grouped by adapter (a ``BatchSplit`` of equal parts) are a view of
        the input; rows of many tokens each take their adapter's weights by index (as under compile),
        which copies less than grouping their tokens; short rows (generation) group their tokens by
        adapter, so each adapter's weights are read once. At inference the first two add into the base
        output in place, as the fused LoRA node does: no update tensor the size of the batch."""
        if torch.compiler.is_compiling():
            # every adapter the layer holds, not the batch's: which ones a batch names changes no guard
            held = tuple(self.adapter_names)
            grouped_path = self.features.kind == LINEAR and not self.lora_magnitude_vector
        else:
            held, grouped_path = self._mixed_batch_plan(rows)
        if not grouped_path:
            return super().mixed_batch_output(x, result, rows)
        if not held:
            return result
        if self.training and any(self._dropout_p(self._adapter(name)) for name in held):
            raise ValueError(
                "a mixed batch (adapter_names=...) runs LoRA without dropout: call model.eval(), or train "
                "with lora_dropout=0"
            )
        lora_a, lora_b = self._stacked(held, zero_slot=True)  # one stack for all three ways (cached)
        if torch.compiler.is_compiling():
            return self._mixed_batch_by_row(x, result, rows, held, lora_a, lora_b)
        rows_x = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
        tokens_per_row = rows_x.shape[0] // x.shape[0]
        grouping = rows.grouping(held, tokens_per_row, x.device)
        if grouping.in_order:
            grouped = rows_x.view(grouping.adapters, grouping.width, -1)
            if self._adds_in_place(result, lora_b):
                out = result.view(grouping.adapters, grouping.width, -1)
                for index in range(grouping.adapters):  # each adapter's rows are one slice of the output
                    out[index].addmm_(grouped[index] @ lora_a[index], lora_b[index])
                return result
            update = torch.bmm(torch.bmm(grouped, lora_a[:-1]), lora_b[:-1])
            return result + update.view(result.shape).to(result.dtype)
        if tokens_per_row >= lora_a.shape[-1]:  # more tokens than the rank: the weights are the smaller copy
            return self._mixed_batch_by_row(x, result, rows, held, lora_a, lora_b)
        lora_a, lora_b = lora_a[:-1], lora_b[:-1]
        padded_x = torch.cat([rows_x, rows_x.new_zeros(1, rows_x.shape[-1])])
        grouped = padded_x.index_select(0, grouping.gather).view(grouping.adapters, grouping.width, -1)
        update = torch.bmm(torch.bmm(grouped, lora_a), lora_b)
        update = update.view(-1, update.shape[-1])
        padded_update = torch.cat([update, update.new_zeros(1, update.shape[-1])])
        flat = result.reshape(-1, result.shape[-1])
        return (flat + padded_update.index_select(0, grouping.scatter).to(flat.dtype)).view(result.shape)

    def _mixed_batch_by_row(
        self,
        x: torch.Tensor,
        result: torch.Tensor,
        rows,
        held: tuple[str, ...],
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
    ) -> torch.Tensor:
        """Each row gathers its adapter's stacked A and B (``_stacked(held, zero_slot=True)``) by index, the
        zero slot for rows without one here. Under torch.compile only tensors change from batch to batch, so
        a new set of adapters recompiles nothing; the stacks are built in the graph, as it can keep no cache
        between calls."""
        positions = rows.row_index(held, x.device)
        slot = torch.where(positions >= 0, positions, len(held))
        rows_x = x.reshape(x.shape[0], -1, x.shape[-1]).to(lora_a.dtype)
        down = torch.bmm(rows_x, lora_a[slot])
        if self._adds_in_place(result, lora_b):
            result.view(down.shape[0], down.shape[1], -1).baddbmm_(down, lora_b[slot])
            return result
        update = torch.bmm(down, lora_b[slot])
        return result + update.view(result.shape).to(result.dtype)

    @staticmethod
    def _adds_in_place(result: torch.Tensor, lora_b: torch.Tensor) -> bool:
        """Whether a mixed batch may add into the base layer's output itself: eagerly (a compiled graph stays
        functional), where no graph records that output (inference, or a first layer whose input needs no
        gradient: autograd then records the in-place add), on a contiguous output of the adapters' dtype."""
        return (
            not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and result.requires_grad)
            and result.dtype == lora_b.dtype
            and result.is_contiguous()
        )

    def _mixed_batch_plan(self, rows) -> tuple[tuple[str, ...], bool]:
        """The adapters of the batch this layer holds, and whether the grouped path can run them (a
        linear layer, no DoRA); kept while the batch names the same adapters and the layer holds the same."""
        key = (tuple(rows.adapters()), tuple(self.lora_A.keys()), tuple(self.lora_magnitude_vector.keys()))
        if self._plan_cache is None or self._plan_cache[0] != key:
            held = tuple(name for name in key[0] if name in key[1])
            grouped_path = self.features.kind == LINEAR and not set(held) & set(key[2])
            self._plan_cache = (key, held, grouped_path)
        return self._plan_cache[1], self._plan_cache[2]

    def _stacked(self, names: tuple[str, ...], zero_slot: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Aᵀ as ``(adapters, in, r)`` and (s·B)ᵀ as ``(adapters, r, out)``, ranks zero-padded to the largest;
        with ``zero_slot``, one more adapter of zeros at the end.

        Kept between calls while no gradient is taken and no tensor or scale has changed (a tensor
        changed in place, by an optimizer, a load or a hot-swap, bumps its version); never under compile."""
        compiling = torch.compiler.is_compiling()
        scales = [self.scaling[name] for name in names]
        if not compiling:
            key = (names, zero_slot, [id(s) if isinstance(s, torch.Tensor) else s for s in scales])
            cached = self._stack_cache
            if cached is not None and cached[0] == key:
                tensors, stamp, stacks = cached[1:]
                if stamp == [t._version for t in tensors]:
                    return stacks
        tensors = [t for name in names for t in self._factor_parameters(name)]
        rank = max(a.shape[0] for a in tensors[0::2])
        a_rows = [F.pad(a, (0, 0, 0, rank - a.shape[0])) for a in tensors[0::2]]
        b_cols = [F.pad(b * s, (0, rank - b.shape[1])) for s, b in zip(scales, tensors[1::2])]
        if zero_slot:
            a_rows.append(a_rows[0].new_zeros(a_rows[0].shape))
            b_cols.append(b_cols[0].new_zeros(b_cols[0].shape))
        # laid out for x @ A then @ B: bmm reads them contiguously, with no transposed copy per call
        stacks = (
            torch.stack(a_rows).transpose(1, 2).contiguous(),
            torch.stack(b_cols).transpose(1, 2).contiguous(),
        )
        if compiling:
            return stacks
        if torch.is_grad_enabled() and any(t.requires_grad for t in stacks):
            self._stack_cache = None
        else:
            tensors += [s for s in scales if isinstance(s, torch.Tensor)]  # a hot-swap fills them in place
            stamp = [t._version for t in tensors]
            self._stack_cache = (key, tensors, stamp, stacks)
        return stacks

    @staticmethod
    def _dropout_p(adapter: Adapter) -> float:
        dropout = adapter.dropout
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def _fuses(
        self, adapter: Adapter, a: torch.Tensor, x: torch.Tensor, base_weight: torch.Tensor | None = None
    ) -> bool:
        """Whether the fused node computes what the plain modules would: a linear layer, no DoRA, and a
        dtype the node can compute in (see :func:`peftkit_lora.fused.compute_dtype`; ``base_weight`` when
        the node is to compute the base output too)."""
        return (
            self.use_fused_linear
            and self.features.kind == LINEAR
            and not adapter.dora
            and fused.compute_dtype(x, a, base_weight) is not None
            # the node draws its dropout seed as a Python int, which torch.compile cannot trace: compiled,
            # the plain modules run, and the compiler keeps the dropout mask its own way
            and not (self._dropout_p(adapter) > 0 and torch.compiler.is_compiling())
        )

    def _dora_output(
        self,
        adapter: Adapter,
        a: torch.Tensor,
        b: torch.Tensor,
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
        norm = dora.row_norms(self._rows(weight), a.flatten(1), b.flatten(1), adapter.scaling)
        scale = self._feature_view(self.lora_magnitude_vector[adapter.name].flatten() / norm, lora)
        if dropped is None or not self.training or isinstance(adapter.dropout, nn.Identity):
            # in at least float32: (scale - 1) · plain nearly cancels the base output where the magnitude is
            # far below the norm, so the rounding of a half-precision plain would not cancel with it
            plain = base_result.to(torch.promote_types(lora.dtype, torch.float32))
            bias = getattr(base, "bias", None)
            if isinstance(bias, torch.Tensor):
                plain = plain - self._feature_view(bias.to(plain.dtype), plain)
        else:
            plain = self._apply_weight(dropped, weight.to(dropped.dtype))
        return (scale - 1) * plain.to(torch.promote_types(lora.dtype, torch.float32)) + scale * lora

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


def _rank_dim(name: str) -> int | None:
    """Where a LoRA tensor (named as saved, relative to its layer) holds the rank: A's rows, B's columns."""
    if name in ("lora_A.weight", "lora_embedding_A"):
        return 0
    if name in ("lora_B.weight", "lora_embedding_B"):
        return 1
    return None


def _cut_rank(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    dim = _rank_dim(name)
    return tensor if dim is None else tensor.narrow(dim, 0, rank)


def _set_rank_size(module: nn.Module, out: int | None = None, into: int | None = None) -> None:
    """Record a padded rank in a ``lora_A`` (``out``) or ``lora_B`` (``into``) module's size attributes."""
    names = (
        ("out_features", "in_features") if isinstance(module, nn.Linear) else ("out_channels", "in_channels")
    )
    if out is not None:
        setattr(module, names[0], out)
    if into is not None:
        setattr(module, names[1], into)
