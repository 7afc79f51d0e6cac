"""The trainable tokens layer: chosen rows of an embedding (or of the output head tied to it) replaced.

Each adapter holds ``trainable_tokens_delta`` (despite PEFT's name, the new values of its rows, not a
difference) and ``trainable_tokens_original`` (those rows as they were, for unmerging). The forward pass
runs the base layer with a weight whose rows ``token_indices`` are the adapter's: only those rows get
gradients, the base weight stays frozen. An output head tied to the embedding gets a layer that shares
the embedding layer's containers, so the logits of those tokens use the same trained rows.

Merging writes the rows into the base weight in place (tied modules see it at once); unmerging writes the
originals back, so the base weight comes back bit for bit. Several adapters may act at once when their
rows are disjoint, as in PEFT.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from peftkit import AdapterLayer
from torch import nn

from peftkit_trainable_tokens.config import TrainableTokensConfig


class TrainableTokensLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer, features=None)
        self._tied_to = [tied_to] if tied_to is not None else []  # a list: not a submodule of this one
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
            self.trainable_tokens_original: dict[str, torch.Tensor] = {}
            self.key_prefixes: dict[str, str] = {}
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
            self.trainable_tokens_original = tied_to.trainable_tokens_original
            self.key_prefixes = tied_to.key_prefixes

    @property
    def tied_to(self) -> TrainableTokensLayer | None:
        return self._tied_to[0] if self._tied_to else None

    def update_layer(self, adapter_name: str, config: TrainableTokensConfig, module_name: str) -> None:
        if self.tied_to is not None:
            return  # the embedding's layer holds the rows
        weight = self.get_base_layer().weight
        rows = config.token_indices
        if max(rows) >= weight.shape[0]:
            raise ValueError(
                f"TrainableTokensConfig.token_indices has {[i for i in rows if i >= weight.shape[0]]}, past the "
                f"{weight.shape[0]} rows of {module_name!r} (resize the model's token embeddings first when "
                "adding new tokens)"
            )
        originals = weight.detach()[rows].clone()
        values = originals if config.init_weights else torch.randn_like(originals)
        self.token_indices[adapter_name] = list(rows)
        self.trainable_tokens_original[adapter_name] = originals
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.clone())
        self._move_to_base(self.trainable_tokens_delta[adapter_name])

    def _index(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter_name], device=device)

    def _check_disjoint(self, adapter_names: list[str]) -> None:
        seen: dict[int, str] = {}
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            for row in self.token_indices[name]:
                if row in seen and seen[row] != name:
                    raise ValueError(
                        f"trainable tokens adapters {seen[row]!r} and {name!r} both hold token {row}: adapters "
                        "that act (or are merged) together must name disjoint token_indices"
                    )
                seen[row] = name

    def weight_with_rows(
        self, weight: torch.Tensor, adapter_names: list[str], rows_from: str
    ) -> torch.Tensor:
        """``weight`` with each adapter's rows set to its trained values (``rows_from="delta"``) or to the
        values they had before (``"original"``)."""
        store = self.trainable_tokens_delta if rows_from == "delta" else self.trainable_tokens_original
        for name in adapter_names:
            weight = weight.index_copy(0, self._index(name, weight.device), store[name].to(weight.dtype))
        return weight

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """The base layer's forward again, with the adapters' rows in its weight (the rows replace, not add)."""
        self._check_disjoint(adapter_names)
        base = self.get_base_layer()
        weight = self.weight_with_rows(base.weight, adapter_names, "delta")
        return torch.func.functional_call(base, {"weight": weight}, (x,))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.row_adapters is not None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        pending = [name for name in self.active_adapters if name not in self.merged_adapters]
        if not pending:
            return self.base_layer(x)
        return self.adapter_output(x, None, pending)  # the base output is not needed: skip computing it

    # --- merging: the rows written into the base weight in place, the originals written back -------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        names = [name for name in names if self.holds(name) and name not in self.merged_adapters]
        if not names:
            return
        self._check_disjoint(names)
        weight = self.get_base_layer().weight
        for name in names:
            values = self.trainable_tokens_delta[name]
            if safe_merge and not torch.isfinite(values).all():
                raise ValueError(f"merging adapter {name!r} would write NaN or inf into the embedding's rows")
            with torch.no_grad():
                weight.index_copy_(0, self._index(name, weight.device), values.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        weight = self.get_base_layer().weight
        for name in reversed(list(self.merged_adapters)):
            if adapter_names is not None and name not in adapter_names:
                continue
            with torch.no_grad():
                original = self.trainable_tokens_original[name]
                weight.index_copy_(0, self._index(name, weight.device), original.to(weight))
            self.merged_adapters.remove(name)

    def adapter_parameters(self, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
        """As PEFT names them: ``trainable_tokens_delta`` for a trainable tokens adapter, on the tied head
        too; ``token_adapter.trainable_tokens_delta`` for another method's rows (LoRA's
        ``trainable_token_indices``), which a tied head shares without naming them again."""
        prefix = self.key_prefixes.get(adapter_name, "")
        if prefix and self.tied_to is not None:
            return []
        return [(prefix + name, param) for name, param in super().adapter_parameters(adapter_name)]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge([adapter_name])
        if self.tied_to is None and adapter_name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[adapter_name]
            self.token_indices.pop(adapter_name, None)
            self.trainable_tokens_original.pop(adapter_name, None)
            self.key_prefixes.pop(adapter_name, None)
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def merge_covers(self, other: AdapterLayer) -> bool:
        # a tied head's layer holds the same rows: merged or not, both compute with the trained rows
        return other is self.tied_to or getattr(other, "tied_to", None) is self

    def extra_repr(self) -> str:
        tied = ", tied to the input embedding" if self.tied_to is not None else ""
        return super().extra_repr() + tied
