"""LoRA's hook implementations: register, inject into targeted layers, train and save biases as asked, and
read and write AdapterHub's LoRA folders (:mod:`peftkit_lora.adapterhub`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_impl
from peftkit.bias_option import bias_hooks

from peftkit_lora.config import LoraConfig

if TYPE_CHECKING:
    from peftkit.foreign_format import ForeignAdapter
    from torch import nn

# PEFT's default targets when target_modules is None, by transformers model_type.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


# what `from peftkit import ...` finds besides LoraConfig, as PEFT exports them
EXPORTS = (
    "peftkit_lora.config:LoftQConfig",
    "peftkit_lora.config:EvaConfig",
    "peftkit_lora.config:CordaConfig",
    "peftkit_lora.eva_init:initialize_lora_eva_weights",
    "peftkit_lora.eva_init:get_eva_state_dict",
)


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [
        MethodSpec(
            name="lora",
            config_class=LoraConfig,
            peft_type="LORA",
            family="weight-delta",
            exports=EXPORTS,
        )
    ]


@hookimpl
def peftkit_model_methods():
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_lora.weighted_adapter import add_weighted_adapter

    return {"add_weighted_adapter": add_weighted_adapter}


@method_impl("lora")
def peftkit_inject_adapter(peft_model, config: LoraConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.injection import fill_default_targets, inject_into_targets

    from peftkit_lora.layer import LoraLayer

    if config.target_parameters and config.target_modules is None:
        config.target_modules = []  # as PEFT records it: no default modules beside the parameters
    fill_default_targets(peft_model, config, DEFAULT_TARGETS)
    if config.target_parameters:
        from peftkit_lora.parameter import inject_into_parameters

        if config.target_modules:
            inject_into_targets(peft_model, config, adapter_name, LoraLayer)
        if not inject_into_parameters(peft_model, config, adapter_name):
            from peftkit.errors import TargetModulesError

            raise TargetModulesError(
                f"LoraConfig.target_parameters={config.target_parameters!r} matched no parameter of "
                f"{type(peft_model.base_model.model).__name__}: name parameters by their full name or a "
                "suffix of it, e.g. 'mlp.experts.gate_up_proj'"
            )
    else:
        inject_into_targets(peft_model, config, adapter_name, LoraLayer)
    if config.trainable_token_indices is not None:
        from peftkit_lora.tokens import add_trainable_tokens

        add_trainable_tokens(peft_model.base_model.model, config, adapter_name)
    return True


@method_impl("lora")
def peftkit_prepare_compiled_hotswap(peft_model, config: LoraConfig, adapter_name: str, target_rank):
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.injection import logical_path

    from peftkit_lora.layer import LoraLayer

    layers = [
        (logical_path(path), layer)
        for path, layer in peft_model.adapter_layers()
        if isinstance(layer, LoraLayer) and layer.holds(adapter_name)
    ]
    for path, layer in layers if target_rank is not None else ():
        held = layer.held_rank(adapter_name)
        if held > target_rank:
            padded = f" (padded to {held} by an earlier call)" if adapter_name in layer.target_rank else ""
            raise ValueError(
                f"adapter {adapter_name!r} holds rank {held}{padded} in {path!r}, above "
                f"target_rank={target_rank}: target_rank must be at least the largest rank of the adapters "
                "loaded and to be swapped in"
            )
    for _, layer in layers:
        layer.prepare_compiled_hotswap(adapter_name, target_rank)
    return True


@method_impl("lora")
def peftkit_initialize_from_data(
    peft_model, config: LoraConfig, adapter_name: str, batches, forward, show_progress, options
):
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    if config.init_lora_weights == "corda":
        from peftkit_lora.corda_init import corda_from_data

        return corda_from_data(peft_model, config, adapter_name, batches, forward, show_progress, options)
    from peftkit_lora.eva_init import eva_from_data

    return eva_from_data(peft_model, config, adapter_name, batches, forward, show_progress, options)


@hookimpl
def peftkit_read_foreign_adapter(folder: Path, model: nn.Module | None) -> ForeignAdapter | None:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_lora import adapterhub

    return adapterhub.read(folder, model)


@method_impl("lora")
def peftkit_save_foreign_adapter(
    peft_model, config: LoraConfig, adapter_name: str, format: str, folder: Path
) -> bool | None:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_lora import adapterhub

    if format != adapterhub.FORMAT:
        return None
    adapterhub.save(peft_model, config, adapter_name, folder)
    return True


# PEFT's ``bias`` option: which base-model biases train, save and load with the adapter
peftkit_trainable_parameters, peftkit_adapter_state_dict, peftkit_load_adapter_state_dict = bias_hooks(
    "lora", "peftkit_lora.layer:LoraLayer"
)
