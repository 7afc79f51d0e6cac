"""Bottleneck adapters' hook implementations: register the method, and wrap the blocks it adapts.

Which blocks those are, by the model's layout or by name: :mod:`peftkit_bottleneck.placement`.
"""

from __future__ import annotations

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_bottleneck.config import BottleneckConfig


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
