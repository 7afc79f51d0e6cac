"""BOFT's hook implementations: register the method, inject into targeted layers, train and save biases as asked."""

from __future__ import annotations

from types import SimpleNamespace

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_boft.config import BOFTConfig

# PEFT 0.21's default targets when target_modules is None (BOFT uses LoRA's table), by model_type.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    # weight-delta: the adapter changes what the layer's weight does (W -> diag(s) W Mᵀ on merge), per layer
    # and per row of a batch; the change is a product, not a sum, which the layer's merged_weight says.
    return [MethodSpec(name="boft", config_class=BOFTConfig, peft_type="BOFT", family="weight-delta")]


@method_impl("boft")
def peftkit_inject_adapter(peft_model, config: BOFTConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.injection import fill_default_targets, inject_into_targets

    from peftkit_boft.layer import BOFTLayer

    fill_default_targets(peft_model, config, DEFAULT_TARGETS)
    inject_into_targets(peft_model, config, adapter_name, BOFTLayer)
    return True


def _bias_rule(config: BOFTConfig) -> SimpleNamespace:
    """The core's bias helper speaks LoRA's names; "boft_only" means its "lora_only" (the wrapped layers' biases)."""
    return SimpleNamespace(bias="lora_only" if config.bias == "boft_only" else config.bias)


@method_impl("boft")
def peftkit_trainable_parameters(peft_model, config: BOFTConfig, adapter_name: str):
    from peftkit import biases

    from peftkit_boft.layer import BOFTLayer

    return list(biases.trained_biases(peft_model, _bias_rule(config), adapter_name, BOFTLayer).items())


@method_impl("boft")
def peftkit_adapter_state_dict(peft_model, config: BOFTConfig, adapter_name: str):
    from peftkit import biases

    from peftkit_boft.layer import BOFTLayer

    return biases.bias_state_dict(peft_model, _bias_rule(config), adapter_name, BOFTLayer)


@method_impl("boft")
def peftkit_load_adapter_state_dict(peft_model, config: BOFTConfig, adapter_name: str, state_dict):
    from peftkit import biases

    from peftkit_boft.layer import BOFTLayer

    return biases.load_biases(peft_model, _bias_rule(config), adapter_name, BOFTLayer, state_dict)
