"""BitFit's hook implementations: register the method, and put offsets on the layers it targets.

Which layers those are, and why BitFit finds them itself: :mod:`peftkit_bitfit.targets`.
"""

from __future__ import annotations

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_bitfit.config import BitFitConfig


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [MethodSpec(name="bitfit", config_class=BitFitConfig, peft_type="BITFIT", family="bias-only")]


@method_impl("bitfit")
def peftkit_inject_adapter(peft_model, config: BitFitConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_bitfit.targets import add_offsets

    add_offsets(peft_model.base_model.model, config, adapter_name)
    return True
