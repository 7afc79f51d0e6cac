"""Bottleneck adapters' hook implementations: register the method (and AdapterFusion, a method of its own
over bottleneck adapters), wrap the blocks it adapts, and read and write AdapterHub's adapter folders.

Which blocks those are, by the model's layout or by name: :mod:`peftkit_bottleneck.placement`; AdapterHub's
folders: :mod:`peftkit_bottleneck.adapterhub`. Each hook imports what it needs when it runs, so loading the
plugin (``peftkit methods``) imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_bottleneck.config import BottleneckConfig
from peftkit_bottleneck.fusion_config import AdapterFusionConfig

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
        ),
        MethodSpec(
            name="adapter_fusion",
            config_class=AdapterFusionConfig,
            peft_type="ADAPTER_FUSION",
            family="inserted-module",
            mergeable=False,
        ),
    ]


@hookimpl
def peftkit_model_methods() -> dict[str, Any]:
    from peftkit_bottleneck.fusion import add_adapter_fusion, get_fusion_regularization_loss

    return {
        "add_adapter_fusion": add_adapter_fusion,
        "get_fusion_regularization_loss": get_fusion_regularization_loss,
    }


@method_impl("bottleneck")
def peftkit_inject_adapter(peft_model, config: BottleneckConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_bottleneck.placement import add_adapters

    add_adapters(peft_model.base_model.model, config, adapter_name)
    return True


@method_impl("adapter_fusion", specname="peftkit_inject_adapter")
def inject_fusion(peft_model, config: AdapterFusionConfig, adapter_name: str) -> bool:
    from peftkit_bottleneck.fusion import add_fusion_layers

    add_fusion_layers(peft_model, config, adapter_name)
    return True


@method_impl("adapter_fusion")
def peftkit_composition_blocks(peft_model, config: AdapterFusionConfig, adapter_name: str) -> list[str]:
    return []  # a fusion runs as Fuse(...) of the adapters it fuses, never as a child of a block


@method_impl("adapter_fusion")
def peftkit_transform_outputs(peft_model, config: AdapterFusionConfig, adapter_name: str, inputs, outputs):
    from peftkit_bottleneck.fusion import with_regularization

    return with_regularization(peft_model, config, adapter_name, outputs)


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


@method_impl("adapter_fusion", specname="peftkit_save_foreign_adapter")
def save_fusion_in_foreign_format(
    peft_model, config: AdapterFusionConfig, adapter_name: str, format: str, folder: Path
) -> bool | None:
    from peftkit_bottleneck import adapterhub

    if format != adapterhub.FORMAT:
        return None
    adapterhub.save_fusion(peft_model, config, adapter_name, folder)
    return True
