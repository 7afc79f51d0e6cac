"""Bottleneck adapters' hook implementations: register the method, wrap the blocks it adapts, and read and
write AdapterHub's adapter folders.

Which blocks those are, by the model's layout or by name: :mod:`peftkit_bottleneck.placement`; AdapterHub's
folders: :mod:`peftkit_bottleneck.adapterhub`. Each hook imports what it needs when it runs, so loading the
plugin (``peftkit methods``) imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_bottleneck.config import BottleneckConfig

if TYPE_CHECKING:
    from peftkit.foreign_format import ForeignAdapter
    from torch import nn


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [
        MethodSpec(
            name="bottleneck",
            config_class=BottleneckConfig,
            peft_type="BOTTLENECK",
            family="inserted-module",
            mergeable=False,
        )
    ]


@method_impl("bottleneck")
def peftkit_inject_adapter(peft_model, config: BottleneckConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_bottleneck.placement import add_adapters

    add_adapters(peft_model.base_model.model, config, adapter_name)
    return True


@hookimpl
def peftkit_read_foreign_adapter(folder: Path, model: nn.Module | None) -> ForeignAdapter | None:
    from peftkit_bottleneck import adapterhub

    return adapterhub.read(folder, model)


@method_impl("bottleneck")
def peftkit_save_foreign_adapter(
    peft_model, config: BottleneckConfig, adapter_name: str, format: str, folder: Path
) -> bool | None:
    from peftkit_bottleneck import adapterhub

    if format != adapterhub.FORMAT:
        return None
    adapterhub.save(peft_model, config, adapter_name, folder)
    return True
