"""Prefix tuning's hook implementations: the prefix module, and each call's KV cache started from it, as PEFT 0.21 does.

What PEFT does, per task, that this file follows:

- every task: ``past_key_values`` is the prefix (any passed in is replaced), the ``attention_mask``
  gets ones in front for the prefix positions, and ``position_ids`` are shifted by
  ``num_virtual_tokens`` (the real tokens come after the prefix); the input ids, embeddings and labels
  are left as they are, so outputs keep the input's length;
- ``SEQ_CLS``, ``TOKEN_CLS``: ``token_type_ids`` are passed on as they are;
- ``QUESTION_ANS``: ``token_type_ids`` and ``position_ids`` are dropped (PEFT's forward takes them and
  never passes them on);
- ``CAUSAL_LM``, ``FEATURE_EXTRACTION``, ``SEQ_2_SEQ_LM``: ``token_type_ids`` are dropped;
- ``SEQ_2_SEQ_LM``: the prefix goes into the decoder's self-attention only, so the
  ``decoder_attention_mask`` gets the ones and the encoder's mask is left as it is.

``generate`` starts the KV cache from the prefix at the step that fills it (PEFT's
``prepare_inputs_for_generation``), and every step's mask and positions account for the prefix.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from peftkit import ConfigError, MethodSpec, hookimpl, method_impl
from peftkit.config import TaskType

from peftkit_prefix_tuning.config import PrefixTuningConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

METHOD = "prefix_tuning"
STATE_KEY = "prompt_embeddings"

KEEPS_TOKEN_TYPES = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS)

IGNORED_INPUT = "prefix tuning ignores {name} for task {task} (as PEFT does)"
GRADIENT_CHECKPOINTING = (
    "prefix tuning does not work with gradient checkpointing: transformers drops the KV cache, which holds "
    "the prefix, in checkpointed layers; turn it off on the base model first "
    "(activation_checkpointing_disable(), formerly gradient_checkpointing_disable())"
)


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [
        MethodSpec(
            name=METHOD,
            config_class=PrefixTuningConfig,
            peft_type="PREFIX_TUNING",
            family="prompt",
            mergeable=False,
            supports_multiple_active=False,
            key_root="base_model.",
        )
    ]


# --- the prefix module -----------------------------------------------------------------------------
def _uses_gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def _takes_past_key_values(model: nn.Module) -> bool:
    import inspect

    return any(
        "past_key_values" in inspect.signature(module.forward).parameters for module in model.modules()
    )


@method_impl(METHOD)
def peftkit_inject_adapter(peft_model, config: PrefixTuningConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_prefix_tuning.prefix import PrefixEncoder, fill_model_shape

    model = peft_model.base_model.model
    if _uses_gradient_checkpointing(model):
        raise ConfigError(GRADIENT_CHECKPOINTING)
    if not _takes_past_key_values(model):
        raise ConfigError(
            f"prefix tuning needs a model that takes past_key_values (a transformers model with a KV cache); "
            f"no module of this {type(model).__name__} does"
        )
    fill_model_shape(config, model)
    # A loaded adapter (inference_mode) holds the prefix itself, as in PEFT: the MLP only shapes training.
    module = PrefixEncoder(config, projected=config.prefix_projection and not config.inference_mode)
    reference = next(model.parameters(), None)
    module.to(reference.device if reference is not None else "cpu").requires_grad_(False)
    peft_model.prompt_modules[adapter_name] = module
    return True


@method_impl(METHOD)
def peftkit_adapter_state_dict(peft_model, config: PrefixTuningConfig, adapter_name: str):
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    with torch.no_grad():
        return {STATE_KEY: peft_model.prompt_modules[adapter_name]()}


@method_impl(METHOD)
def peftkit_load_adapter_state_dict(peft_model, config: PrefixTuningConfig, adapter_name: str, state_dict):
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.serialization import copy_checked, saved_tensor

    from peftkit_prefix_tuning.prefix import PrefixEncoder

    saved = saved_tensor(state_dict, STATE_KEY, "prefix tuning")
    module = peft_model.prompt_modules[adapter_name]
    if module.transform is not None:
        # Loading to train on (is_trainable=True) with prefix_projection: the file holds the prefix, not
        # the MLP that made it, so training goes on from the prefix itself.
        trainable = module.embedding.weight.requires_grad
        module = PrefixEncoder(config, projected=False).to(module.embedding.weight.device)
        module.requires_grad_(trainable)
        peft_model.prompt_modules[adapter_name] = module
        warnings.warn(
            "this prefix tuning adapter was saved as its prefix, without the prefix_projection MLP that "
            "trained it; training continues on the prefix directly",
            UserWarning,
            stacklevel=2,
        )
    weight = module.embedding.weight
    copy_checked(STATE_KEY, saved, weight)
    return [STATE_KEY]


# --- forward ---------------------------------------------------------------------------------------
def _batch_size(inputs: dict[str, Any], keys=("input_ids", "inputs_embeds")) -> int:
    for key in keys:
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise ValueError(f"a model with a prefix tuning adapter needs one of {', '.join(keys)}")


def _ones_before(mask: torch.Tensor, count: int) -> torch.Tensor:
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    return torch.cat((mask.new_ones(mask.shape[0], count), mask), dim=1)


def _all_ones_mask(inputs: dict[str, Any]) -> torch.Tensor:
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
    return torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)


def _drop(inputs: dict[str, Any], name: str, task: TaskType, warn: bool = True) -> None:
    if inputs.get(name) is not None:
        if warn:
            warnings.warn(IGNORED_INPUT.format(name=name, task=task.value), UserWarning, stacklevel=4)
        inputs[name] = None


def _model_dtype(model: nn.Module) -> torch.dtype:
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _start_cache(peft_model, config: PrefixTuningConfig, adapter_name: str, batch_size: int):
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_prefix_tuning.prefix import prefix_cache

    model = peft_model.base_model.model
    return prefix_cache(peft_model.prompt_modules[adapter_name], config, batch_size, _model_dtype(model))


def _mask_key(config: PrefixTuningConfig) -> str:
    return "decoder_attention_mask" if config.task_type == TaskType.SEQ_2_SEQ_LM else "attention_mask"


def _shift_or_drop_token_inputs(inputs: dict[str, Any], config: PrefixTuningConfig, warn: bool) -> None:
    task = config.task_type
    if task == TaskType.QUESTION_ANS:
        _drop(inputs, "position_ids", task, warn)
    elif inputs.get("position_ids") is not None:
        inputs["position_ids"] = inputs["position_ids"] + config.num_virtual_tokens
    if task not in KEEPS_TOKEN_TYPES:
        _drop(inputs, "token_type_ids", task, warn)


@method_impl(METHOD)
def peftkit_transform_inputs(peft_model, config: PrefixTuningConfig, adapter_name: str, inputs):
    inputs = dict(inputs)
    inputs.pop("task_ids", None)  # PEFT's multitask argument; plain prefix tuning takes none
    if peft_model.training and _uses_gradient_checkpointing(peft_model.base_model.model):
        raise ConfigError(GRADIENT_CHECKPOINTING)
    batch_size = _batch_size(inputs)
    mask_key = _mask_key(config)
    if inputs.get(mask_key) is None and mask_key == "attention_mask":
        # An explicit all-ones mask, prefix included: without one a compiled model builds its mask from
        # the input's length alone (transformers 5.17 under torch.compile), shorter than the keys.
        inputs[mask_key] = _all_ones_mask(inputs)
    if inputs.get(mask_key) is not None:
        inputs[mask_key] = _ones_before(inputs[mask_key], config.num_virtual_tokens)
    _shift_or_drop_token_inputs(inputs, config, warn=True)
    inputs["past_key_values"] = _start_cache(peft_model, config, adapter_name, batch_size)
    return inputs


# --- generate --------------------------------------------------------------------------------------
GENERATE_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)


@method_impl(METHOD)
def peftkit_prepare_generation(peft_model, config: PrefixTuningConfig, adapter_name: str, inputs):
    if config.task_type not in GENERATE_TASKS:
        return None
    inputs = dict(inputs)
    inputs.pop("task_ids", None)
    _drop(inputs, "token_type_ids", config.task_type)
    return inputs  # the prefix goes in step by step: peftkit_prepare_generation_step


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):  # the legacy cache format
        return cache[0][0].shape[-2]
    return cache.get_seq_length()


def _step_mask(mask: Any) -> torch.Tensor:
    if isinstance(mask, dict):  # one mask per attention kind
        if len(mask) != 1:
            raise ValueError(
                f"prefix tuning can extend one attention mask per generation step, got {len(mask)} "
                f"({', '.join(sorted(mask))})"
            )
        mask = next(iter(mask.values()))
    if mask.dim() != 2:
        raise ValueError(
            f"prefix tuning can extend a 2D attention mask, got a {mask.dim()}D one: generate with the default "
            "dynamic cache (not a static or other compilable cache)"
        )
    return mask


@method_impl(METHOD)
def peftkit_prepare_generation_step(peft_model, config: PrefixTuningConfig, adapter_name: str, model_inputs):
    if config.task_type not in GENERATE_TASKS:
        return None
    inputs = dict(model_inputs)
    cache = inputs.get("past_key_values")
    if inputs.get("use_cache") is False:
        # generate() hands back the cache of the previous step even without caching: every step starts
        # again from the prefix alone, over the whole sequence
        cache = None
    ids_key = "decoder_input_ids" if config.task_type == TaskType.SEQ_2_SEQ_LM else "input_ids"
    if config.task_type == TaskType.CAUSAL_LM and inputs.get("input_ids") is not None:
        if _cache_length(cache) >= inputs["input_ids"].shape[1]:
            inputs["input_ids"] = inputs["input_ids"][:, -1:]  # the cache holds the rest, prefix included
    mask_key = _mask_key(config)
    if inputs.get(mask_key) is not None:
        inputs[mask_key] = _ones_before(_step_mask(inputs[mask_key]), config.num_virtual_tokens)
    _shift_or_drop_token_inputs(inputs, config, warn=False)
    if _cache_length(cache) == 0:  # the step that fills the cache starts from the prefix
        batch_size = _batch_size(inputs, (ids_key, "inputs_embeds"))
        inputs["past_key_values"] = _start_cache(peft_model, config, adapter_name, batch_size)
    return inputs
