"""LoKr's hook implementations: register the method and inject it into the targeted layers."""

from __future__ import annotations

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_lokr.config import LoKrConfig

# PEFT's default targets when target_modules is None, by transformers model_type (LoKr uses LoRA's table).
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


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [MethodSpec(name="lokr", config_class=LoKrConfig, peft_type="LOKR", family="weight-delta")]


@method_impl("lokr")
def peftkit_inject_adapter(peft_model, config: LoKrConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.injection import fill_default_targets, inject_into_targets

    from peftkit_lokr.layer import LoKrLayer

    fill_default_targets(peft_model, config, DEFAULT_TARGETS)
    inject_into_targets(peft_model, config, adapter_name, LoKrLayer)
    return True
