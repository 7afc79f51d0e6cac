"""Swapping a loaded adapter's weights in place for those of a saved adapter of the same structure.

The mechanism behind :func:`peftkit.hotswap_adapter` and ``PeftModel.load_adapter(..., hotswap=True)``.
No module is created or replaced and no parameter is rebound, so a compiled model's graphs and an
optimizer's references to the adapter's parameters stay valid. Only the config fields the adapter's
layer classes list in ``AdapterLayer.hotswap_fields`` may differ, and each layer's
:meth:`~peftkit.adapter_layer.AdapterLayer.update_scalars` applies them. It works on a
:class:`~peftkit.PeftModel` without importing :mod:`peftkit.model`, which imports it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftkit import plugins, serialization
from peftkit.config import PeftConfig, with_task_heads
from peftkit.errors import AdapterLoadError, AdapterNameError
from peftkit.injection import logical_path, resolved_targets
from peftkit.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from peftkit.model import PeftModel

# Fields that say where an adapter came from or how it is loaded, not what it computes.
_BOOKKEEPING_FIELDS = frozenset(
    {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
)


def swap_adapter(
    peft_model: PeftModel,
    folder: str | Path,
    adapter_name: str,
    torch_device: str | torch.device | None = None,
) -> None:
    """Give the loaded adapter ``adapter_name`` the weights (and config) saved in ``folder``, in place.

    Every check runs before anything changes: the adapter exists and is not merged, the saved adapter is
    of the same method and structure (a field that differs is an :class:`~peftkit.AdapterLoadError`
    naming it), and every tensor fits. The adapter keeps its name, activation and trainability.
    """
    _check_swappable(peft_model, adapter_name)
    config = with_task_heads(serialization.load_config(folder))
    _check_compatible(peft_model, adapter_name, config, Path(folder))
    state = serialization.read_tensors(folder)
    if torch_device is not None:
        state = {key: tensor.to(torch_device) for key, tensor in state.items()}
    _copy_all_or_nothing(peft_model, adapter_name, state)
    for path, layer in peft_model.adapter_layers():
        if layer.holds(adapter_name):
            layer.update_scalars(adapter_name, config, logical_path(path))
    old = peft_model.peft_config[adapter_name]
    config.inference_mode = old.inference_mode
    config.base_model_name_or_path = config.base_model_name_or_path or old.base_model_name_or_path
    peft_model.peft_config[adapter_name] = config


def _check_swappable(peft_model: PeftModel, adapter_name: str) -> None:
    if adapter_name not in peft_model.peft_config:
        raise AdapterNameError(
            f"cannot hot-swap adapter {adapter_name!r}: this model has no adapter of that name (it has "
            f"{sorted(peft_model.peft_config)}); a hot-swap replaces a loaded adapter's weights, "
            "load_adapter(path, name) without hotswap adds a new adapter"
        )
    if any(adapter_name in layer.merged_adapters for _, layer in peft_model.adapter_layers()):
        raise AdapterLoadError(
            f"cannot hot-swap adapter {adapter_name!r} while it is merged into the base weights (unmerging "
            "afterwards would take out the new weights, not the merged ones): call unmerge_adapter() first"
        )


def _hotswap_fields(peft_model: PeftModel, adapter_name: str) -> tuple[str, ...]:
    """The config fields that may differ in a hot-swap: those every layer holding the adapter can update."""
    allowed = [
        set(layer.hotswap_fields_of(adapter_name))
        for _, layer in peft_model.adapter_layers()
        if layer.holds(adapter_name) and not isinstance(layer, ModulesToSaveWrapper)
    ]
    return tuple(sorted(set.intersection(*allowed))) if allowed else ()


def _check_compatible(peft_model: PeftModel, adapter_name: str, new: PeftConfig, folder: Path) -> None:
    old = peft_model.peft_config[adapter_name]
    where = f"cannot hot-swap {str(folder)!r} into adapter {adapter_name!r}"
    if type(new) is not type(old):
        raise AdapterLoadError(
            f"{where}: it is a {new.method} adapter ({type(new).__name__}) but {adapter_name!r} is a "
            f"{old.method} adapter ({type(old).__name__}); a hot-swap keeps the method"
        )
    allowed = _hotswap_fields(peft_model, adapter_name)
    for field in dataclasses.fields(old):
        if field.name in _BOOKKEEPING_FIELDS or field.name in allowed:
            continue
        if _comparable(peft_model, old, field.name) != _comparable(peft_model, new, field.name):
            raise AdapterLoadError(
                f"{where}: {type(old).__name__}.{field.name} is {getattr(old, field.name)!r} in the loaded "
                f"adapter but {getattr(new, field.name)!r} in the new one. A hot-swap keeps the adapter's "
                f"shapes and layers; fields that may differ: {', '.join(allowed) or 'none'}. Load it as "
                "another adapter instead: load_adapter(path, other_name)"
            )


def _comparable(peft_model: PeftModel, config: PeftConfig, name: str) -> Any:
    value = getattr(config, name)
    if name == "target_modules":  # "all-linear" stands for the layer names it selects in this model
        value = resolved_targets(peft_model.base_model.model, config)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, (str, int)) for v in value):
        return frozenset(value) or None  # module names and layer indices: order and [] vs None do not matter
    return value


def _copy_all_or_nothing(peft_model: PeftModel, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy with the ordinary loader, which checks every layer tensor's key and shape before it copies any;
    should a method's own tensors or a leftover key fail after that, what was copied is put back."""
    written = _tensors_a_load_writes(peft_model, adapter_name, state)
    backup = [tensor.detach().clone() for tensor in written]
    try:
        serialization.load_adapter_state_dict(peft_model, adapter_name, state)
    except BaseException:
        with torch.no_grad():
            for tensor, old in zip(written, backup):
                tensor.copy_(old)
        raise


def _tensors_a_load_writes(
    peft_model: PeftModel, adapter_name: str, state: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    config = peft_model.peft_config[adapter_name]
    key_root = plugins.method_for_config(config).key_root
    tensors = list(serialization.layer_tensors(peft_model, adapter_name, key_root).values())
    tensors += plugins.extra_state_dict(peft_model, config, adapter_name).values()
    base_params = dict(peft_model.base_model.model.named_parameters())  # base weights saved beside an adapter
    names = [key[len(key_root) :] for key in state if key.startswith(key_root)]
    tensors += [base_params[name] for name in names if name in base_params]
    return tensors
