"""Prompt tuning's hook implementations: the prompt module, and its virtual tokens before the input.

How the inputs are rewritten, task by task, as PEFT 0.21 does it: :mod:`peftkit_prompt_tuning.virtual_tokens`.
"""

from __future__ import annotations

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_prompt_tuning import virtual_tokens
from peftkit_prompt_tuning.config import PromptTuningConfig

METHOD = "prompt_tuning"
STATE_KEY = "prompt_embeddings"


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [
        MethodSpec(
            name=METHOD,
            config_class=PromptTuningConfig,
            peft_type="PROMPT_TUNING",
            family="prompt",
            mergeable=False,
            supports_multiple_active=False,
            needs_tokenizer=True,
            key_root="base_model.",
        )
    ]


# --- the prompt module -----------------------------------------------------------------------------
@method_impl(METHOD)
def peftkit_inject_adapter(peft_model, config: PromptTuningConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_prompt_tuning.embedding import build_prompt_embedding, fill_model_shape

    model = peft_model.base_model.model
    fill_model_shape(config, model)
    module = build_prompt_embedding(config, model)
    module.requires_grad_(False)
    peft_model.prompt_modules[adapter_name] = module
    return True


@method_impl(METHOD)
def peftkit_adapter_state_dict(peft_model, config: PromptTuningConfig, adapter_name: str):
    return {STATE_KEY: peft_model.prompt_modules[adapter_name].embedding.weight}


@method_impl(METHOD)
def peftkit_load_adapter_state_dict(peft_model, config: PromptTuningConfig, adapter_name: str, state_dict):
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.serialization import copy_checked, saved_tensor

    saved = saved_tensor(state_dict, STATE_KEY, "prompt tuning")
    weight = peft_model.prompt_modules[adapter_name].embedding.weight
    copy_checked(STATE_KEY, saved, weight)
    return [STATE_KEY]


# --- forward and generate --------------------------------------------------------------------------
LABEL = "prompt tuning"


peftkit_transform_inputs, peftkit_prepare_generation, peftkit_prepare_generation_step = (
    virtual_tokens.input_hooks(METHOD, LABEL)
)
