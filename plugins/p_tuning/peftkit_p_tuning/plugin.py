"""P-tuning's hook implementations: the prompt encoder, and inputs rewritten as PEFT 0.21 does.

PEFT places P-tuning's virtual tokens exactly as prompt tuning's (before the input embeddings, the
mask, labels and ``token_type_ids`` adjusted per task, ``generate`` step by step); only where the
tokens come from differs. So the input handling is peftkit-prompt-tuning's, called on this plugin's
prompt module, which has the same interface (``module(batch_size)``, ``word_embeddings_path``).
"""

from __future__ import annotations

import warnings

from peftkit import ConfigError, MethodSpec, hookimpl, method_impl
from peftkit_prompt_tuning import virtual_tokens

from peftkit_p_tuning.config import PromptEncoderConfig

METHOD = "p_tuning"
STATE_KEY = "prompt_embeddings"


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [
        MethodSpec(
            name=METHOD,
            config_class=PromptEncoderConfig,
            peft_type="P_TUNING",
            family="prompt",
            mergeable=False,
            supports_multiple_active=False,
            key_root="base_model.",
        )
    ]


# --- the prompt encoder ----------------------------------------------------------------------------
@method_impl(METHOD)
def peftkit_inject_adapter(peft_model, config: PromptEncoderConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_prompt_tuning.embedding import fill_model_shape, find_word_embeddings

    from peftkit_p_tuning.encoder import PromptEncoder

    model = peft_model.base_model.model
    fill_model_shape(config, model)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    path = find_word_embeddings(model)
    weight = model.get_submodule(path).weight
    if weight.shape[1] != config.token_dim:
        raise ConfigError(
            f"{type(config).__name__}.token_dim must be the width of the model's word embeddings "
            f"({weight.shape[1]}), got {config.token_dim}"
        )
    # A loaded adapter (inference_mode) holds the virtual tokens themselves, as in PEFT.
    module = PromptEncoder(config, path, with_encoder=not config.inference_mode)
    module.to(weight.device).requires_grad_(False)
    peft_model.prompt_modules[adapter_name] = module
    return True


@method_impl(METHOD)
def peftkit_adapter_state_dict(peft_model, config: PromptEncoderConfig, adapter_name: str):
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    with torch.no_grad():
        return {STATE_KEY: peft_model.prompt_modules[adapter_name].virtual_tokens()}


@method_impl(METHOD)
def peftkit_load_adapter_state_dict(peft_model, config: PromptEncoderConfig, adapter_name: str, state_dict):
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.serialization import copy_checked, saved_tensor

    from peftkit_p_tuning.encoder import PromptEncoder

    saved = saved_tensor(state_dict, STATE_KEY, "P-tuning")
    module = peft_model.prompt_modules[adapter_name]
    if module.mlp_head is not None:
        # Loading to train on (is_trainable=True): the file holds the encoder's output, not the encoder,
        # so training goes on from the virtual tokens themselves.
        trainable = module.embedding.weight.requires_grad
        module = PromptEncoder(config, module.word_embeddings_path, with_encoder=False)
        module.to(peft_model.prompt_modules[adapter_name].embedding.weight.device).requires_grad_(trainable)
        peft_model.prompt_modules[adapter_name] = module
        warnings.warn(
            "this P-tuning adapter was saved as its virtual tokens, without the prompt encoder that trained "
            "them; training continues on the virtual tokens directly",
            UserWarning,
            stacklevel=2,
        )
    weight = module.embedding.weight
    copy_checked(STATE_KEY, saved, weight)
    return [STATE_KEY]


# --- forward and generate: virtual tokens placed as prompt tuning places them -------------------------
LABEL = "P-tuning"


peftkit_transform_inputs, peftkit_prepare_generation, peftkit_prepare_generation_step = (
    virtual_tokens.input_hooks(METHOD, LABEL)
)
