"""The LN tuning layer: a targeted module (a LayerNorm, an RMSNorm) runs a trainable copy of itself.

Each adapter holds a full copy of the module, made when the adapter is added; the forward pass of an
active adapter calls its copy instead of the original, which stays frozen. Only one adapter of a layer can
act at a time: two copies of one norm do not combine. A half-precision model's copies train in float32
(the core's ``autocast_adapter_dtype``) and run cast to the module's own dtypes, so a copy computes what
the module would with the copy's values, as PEFT's copies, kept in the module's dtype, do.

Merging writes the copy's tensors into the original module and keeps the original's tensors aside;
unmerging writes those back, so the base comes back bit for bit. (PEFT swaps the two modules instead;
writing in place keeps the base module's parameters the objects the model and its optimizer know, and
the adapter's copy keeps the adapter's values while it is merged.)
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from peftkit import AdapterLayer
from torch import nn

from peftkit_ln_tuning.config import LNTuningConfig


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by name, as its state dict names them (read directly: torch
    2.11's dynamo cannot trace ``state_dict`` inside a compiled forward)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


class LNTuningLayer(AdapterLayer):
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module, features=None) -> None:
        super().__init__(base_layer, features)
        self.ln_tuning_layers = nn.ModuleDict()
        # adapter name -> the base module's tensors as they were before that adapter was merged
        self.merged_originals: dict[str, dict[str, torch.Tensor]] = {}

    def update_layer(self, adapter_name: str, config: LNTuningConfig, module_name: str) -> None:
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(self.get_base_layer())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            result = self.base_layer(x, *args, **kwargs)
            self.row_adapters.check_rows(x.shape[0], type(self).__name__)
            return self.mixed_batch_output(x, result, self.row_adapters)
        pending = [name for name in self.active_adapters if name not in self.merged_adapters]
        if self.merged_adapters or not pending:
            return self.base_layer(x, *args, **kwargs)
        return self._run_copy(self._copy_of(pending), x, *args, **kwargs)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """The adapter's copy on ``x``: it replaces the base output ``result`` rather than adding to it."""
        return self._run_copy(self._copy_of(adapter_names), x)

    def _run_copy(self, copied: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The copy's forward with its tensors in the dtypes of the base module's (float32 copies of a
        half-precision norm are cast at this boundary; gradients reach the float32 tensors)."""
        base = module_tensors(self.get_base_layer())
        tensors = module_tensors(copied)
        if all(tensor.dtype == base[key].dtype for key, tensor in tensors.items()):
            return copied(x, *args, **kwargs)
        cast = {key: tensor.to(base[key].dtype) for key, tensor in tensors.items()}
        return torch.func.functional_call(copied, cast, (x, *args), kwargs)

    def _copy_of(self, adapter_names: list[str]) -> nn.Module:
        if len(adapter_names) != 1:
            raise ValueError(
                f"LN tuning runs one adapter per layer at a time, but {adapter_names} are active on this "
                f"{type(self.get_base_layer()).__name__}: activate one of them (set_adapter(name))"
            )
        return self.ln_tuning_layers[adapter_names[0]]

    # --- merging: the copy's values written into the base module, the originals kept aside ---------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        names = [name for name in names if self.holds(name) and name not in self.merged_adapters]
        if not names:
            return
        if len(names) > 1:
            raise ValueError(
                f"LN tuning merges one adapter at a time, but {names} were asked for: each would replace the "
                f"same {type(self.get_base_layer()).__name__}'s tensors"
            )
        if self.merged_adapters:
            self.unmerge()  # as PEFT does: the newly merged adapter replaces the one merged before
        name = names[0]
        base = module_tensors(self.get_base_layer())
        replacement = module_tensors(self.ln_tuning_layers[name])
        if safe_merge and not all(
            torch.isfinite(t).all() for t in replacement.values() if t.is_floating_point()
        ):
            raise ValueError(f"merging adapter {name!r} would write NaN or inf into the base layer's tensors")
        self.merged_originals[name] = {key: tensor.detach().clone() for key, tensor in base.items()}
        with torch.no_grad():
            for key, tensor in base.items():
                tensor.copy_(replacement[key])
        self.merged_adapters.append(name)

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        base = module_tensors(self.get_base_layer())
        for name in list(self.merged_adapters):
            if adapter_names is not None and name not in adapter_names:
                continue
            with torch.no_grad():
                for key, original in self.merged_originals.pop(name).items():
                    base[key].copy_(original)
            self.merged_adapters.remove(name)
