"""Task heads and other whole modules that train as a copy per adapter (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy
import re
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.adapter_layer import AdapterLayer
from peftkit.composition import BLOCK_NAMES
from peftkit.layer_access import LayerFeatures


class ModulesToSaveWrapper(AdapterLayer):
    """Keeps the original module and one trainable copy per adapter; the first active copy runs.

    Saved as PEFT saves it: the copy's tensors under the module's own path (``classifier.weight``).
    """

    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("modules_to_save",)
    # a composition holds at most one adapter with a head (PeftModel.set_adapter checks), which serves it all
    composition_blocks: ClassVar[tuple[str, ...]] = BLOCK_NAMES

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, features=LayerFeatures("linear", 0, 0))
        self.modules_to_save = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: Any = None, module_name: str = "") -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.base_layer)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or not self.active_adapters:
            return self.base_layer(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)

    def adapter_parameters(self, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
        if adapter_name not in self.modules_to_save:
            return []
        return list(self.modules_to_save[adapter_name].named_parameters())

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Nothing to fold in: the active copy simply replaces the original on unload."""

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Nothing was folded in."""

    def unloaded(self) -> nn.Module:
        if self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.base_layer


def matches_module_to_save(module_path: str, names: list[str]) -> bool:
    """PEFT's rule: a name matches the module with that name and everything inside it."""
    return any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", module_path) for name in names)


def wrap_modules_to_save(model: nn.Module, names: list[str] | None, adapter_name: str) -> list[str]:
    """Give every module named in ``names`` (by last path component, as PEFT matches) a copy for the adapter."""
    if not names:
        return []
    wrapped = []
    for path, module in list(model.named_modules()):
        if not path or not any(path == n or path.endswith("." + n) for n in names):
            continue
        if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
            continue
        if _inside_wrapper(model, path):
            continue
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            model.set_submodule(path, module)
        module.update_layer(adapter_name)
        wrapped.append(path)
    return wrapped


def _inside_wrapper(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), AdapterLayer):
            return True
    return False
