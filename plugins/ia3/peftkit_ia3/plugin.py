"""(IA)³'s hook implementations: register the method, fill PEFT's defaults, inject into targeted layers."""

from __future__ import annotations

from peftkit import ConfigError, MethodSpec, TargetModulesError, hookimpl, method_impl

from peftkit_ia3.config import IA3Config

# PEFT's defaults when target_modules / feedforward_modules is None, by transformers model_type:
# (targets, feed-forward targets). Feed-forward ones scale their input, the others their output.
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
}


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [MethodSpec(name="ia3", config_class=IA3Config, peft_type="IA3", family="activation-scaling")]


@method_impl("ia3")
def peftkit_inject_adapter(peft_model, config: IA3Config, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.injection import inject_into_targets

    from peftkit_ia3.layer import IA3Layer

    fill_architecture_defaults(config, peft_model.base_model.model)
    inject_into_targets(peft_model, config, adapter_name, IA3Layer)
    return True


def fill_architecture_defaults(config: IA3Config, model) -> None:
    """PEFT's rule: each of target_modules and feedforward_modules left None takes the default of the
    model's architecture, even when the other one is given."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = DEFAULT_MODULES.get(model_type)
    if config.target_modules is None:
        if defaults is None:
            raise TargetModulesError(
                f"IA3Config.target_modules is None and peftkit-ia3 has no default for model_type {model_type!r}; "
                "name the modules to adapt (e.g. target_modules=['k_proj', 'v_proj', 'down_proj'] or 'all-linear')"
            )
        config.target_modules = list(defaults[0])
    if config.feedforward_modules is None:
        if defaults is None:
            raise ConfigError(
                f"IA3Config.feedforward_modules is None and peftkit-ia3 has no default for model_type "
                f"{model_type!r}; name the targets whose input IA3 scales (the MLP's output projection, "
                "e.g. feedforward_modules=['down_proj']), or pass [] to scale every target's output"
            )
        config.feedforward_modules = list(defaults[1])
