"""LN tuning's hook implementations: register the method, fill PEFT's default norms, put copies on them.

Targets are wrapped here rather than by :func:`peftkit.inject_into_targets`: norm layers are no layer kind
the core's layer hooks know, and LN tuning copies whatever module it targets. Matching itself (names,
suffixes, regexes, ``exclude_modules``, ``modules_to_save``) is the core's.
"""

from __future__ import annotations

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_ln_tuning.config import LNTuningConfig

# PEFT 0.21's default targets when target_modules is None, by transformers model_type
# (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": [
        "multi_modal_projector",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "embed_tokens",
        "lm_head",
    ],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "gemma3_text": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    # weight-delta: the adapter is new values for the norm's own tensors, merged by writing them in, and
    # it acts on each row (token) separately, so mixed batches work. Two copies of one norm do not
    # combine: one adapter at a time.
    return [
        MethodSpec(
            name="ln_tuning",
            config_class=LNTuningConfig,
            peft_type="LN_TUNING",
            family="weight-delta",
            supports_multiple_active=False,
        )
    ]


@method_impl("ln_tuning")
def peftkit_inject_adapter(peft_model, config: LNTuningConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit import TargetModulesError
    from peftkit.injection import fill_default_targets

    from peftkit_ln_tuning.targets import add_copies

    model_type = getattr(getattr(peft_model.base_model.model, "config", None), "model_type", None)
    if config.target_modules is None and model_type not in DEFAULT_TARGETS:
        raise TargetModulesError(
            f"LNTuningConfig.target_modules is None and peftkit-ln-tuning has no default for model_type "
            f"{model_type!r}; name the norm layers to tune (e.g. target_modules=['LayerNorm'] or "
            "['input_layernorm', 'post_attention_layernorm'])"
        )
    fill_default_targets(peft_model, config, DEFAULT_TARGETS)
    add_copies(peft_model.base_model.model, config, adapter_name)
    return True
