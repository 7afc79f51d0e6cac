"""Virtual tokens before the input embeddings: the inputs rewritten as PEFT 0.21 does, for every such method.

Prompt tuning and P-tuning differ only in how they make the virtual tokens (a table, an encoder); both
put them in front of the input in the same way, through these functions. ``module(batch_size)`` gives
the virtual tokens and ``module.word_embeddings_path`` names the base model's word embeddings;
``label`` is the method as messages name it.

What PEFT does, per task, that this file follows:

- every task: the virtual tokens go before the input embeddings (``input_ids`` are embedded with the
  base model's word embeddings), the ``attention_mask`` gets ones in front, and ``position_ids`` are
  dropped (the model counts positions itself, virtual tokens included);
- ``CAUSAL_LM``: ``labels`` get ``-100`` in front, ``token_type_ids`` are dropped;
- ``SEQ_CLS``, ``TOKEN_CLS``: ``token_type_ids`` get zeros in front; labels are left as they are;
- ``QUESTION_ANS``: ``token_type_ids`` are dropped (PEFT's forward takes them and never passes them
  on); answer positions are left as they are;
- ``FEATURE_EXTRACTION``: ``token_type_ids`` are dropped;
- ``SEQ_2_SEQ_LM``: the first ``num_virtual_tokens`` rows go before the encoder's input only; the
  decoder's inputs, its mask and the labels are left as they are; ``token_type_ids`` are dropped.

``generate`` for ``CAUSAL_LM`` works step by step, as PEFT's ``prepare_inputs_for_generation``: the
virtual tokens go in at the step that starts the KV cache, and every step's mask gets ones in front.
For ``SEQ_2_SEQ_LM`` the encoder's input is built once, before ``generate``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftkit import method_impl
from peftkit.config import TaskType

if TYPE_CHECKING:
    import torch

# The tasks for which PEFT passes token_type_ids on, with zeros for the virtual tokens; others drop them.
KEEPS_TOKEN_TYPES = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS)

IGNORED_INPUT = "{label} ignores {name} (as PEFT does): the virtual tokens come first, so {why}"
WHY_IGNORED = {
    "position_ids": "the model numbers the positions itself",
    "token_type_ids": "this task's model gets none",
}


# --- forward ---------------------------------------------------------------------------------------
def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along the sequence dimension.

    torch is imported here, not at the top: plugins bind this module's hooks when they load, and loading
    them (peftkit methods) stays torch-free.
    """
    import torch

    return torch.cat(tensors, dim=1)


def _batch_size(inputs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise ValueError("a model with a virtual-token adapter needs input_ids or inputs_embeds")


def _ones_before(mask: torch.Tensor, count: int) -> torch.Tensor:
    return _cat((mask.new_ones(mask.shape[0], count), mask))


def _drop(inputs: dict[str, Any], name: str, label: str, warn: bool = True) -> None:
    if inputs.get(name) is not None:
        if warn:
            message = IGNORED_INPUT.format(label=label, name=name, why=WHY_IGNORED[name])
            warnings.warn(message, UserWarning, stacklevel=5)
        inputs[name] = None


def _embed_with_prompt(peft_model, config: Any, module: Any, input_ids, inputs_embeds) -> torch.Tensor:
    """The input embeddings with the virtual tokens in front (an encoder-decoder's first half only)."""
    if inputs_embeds is None:
        word_embeddings = peft_model.base_model.model.get_submodule(module.word_embeddings_path)
        inputs_embeds = word_embeddings(input_ids)
    prompts = module(inputs_embeds.shape[0]).to(inputs_embeds.dtype)
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        prompts = prompts[:, : config.num_virtual_tokens]
    return _cat((prompts, inputs_embeds))


def prepend_virtual_tokens(peft_model, config: Any, module: Any, inputs: dict, label: str) -> dict:
    """One forward call's keyword arguments with the virtual tokens in front (``peftkit_transform_inputs``)."""
    inputs = dict(inputs)
    inputs.pop("task_ids", None)  # PEFT's multitask argument; these methods take none
    batch_size = _batch_size(inputs)
    count = config.num_virtual_tokens
    task = config.task_type
    if inputs.get("attention_mask") is not None:
        inputs["attention_mask"] = _ones_before(inputs["attention_mask"], count)
    _drop(inputs, "position_ids", label)
    if task in KEEPS_TOKEN_TYPES:
        if inputs.get("token_type_ids") is not None:
            token_types = inputs["token_type_ids"]
            inputs["token_type_ids"] = _cat((token_types.new_zeros(batch_size, count), token_types)).long()
    else:
        _drop(inputs, "token_type_ids", label)
    if task == TaskType.CAUSAL_LM and inputs.get("labels") is not None:
        labels = inputs["labels"]
        inputs["labels"] = _cat((labels.new_full((batch_size, count), -100), labels))
    input_ids, inputs_embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
    inputs["inputs_embeds"] = _embed_with_prompt(peft_model, config, module, input_ids, inputs_embeds)
    return inputs


# --- generate --------------------------------------------------------------------------------------
GENERATE_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)


def prepare_generation(peft_model, config: Any, module: Any, inputs: dict, label: str) -> dict | None:
    """A ``generate()`` call's keyword arguments (``peftkit_prepare_generation``); None to leave them."""
    if config.task_type not in GENERATE_TASKS:
        return None
    inputs = dict(inputs)
    if inputs.get("input_ids") is None or inputs.get("inputs_embeds") is not None:
        raise ValueError(
            f"generate() with a {label} adapter takes input_ids (and no inputs_embeds): the adapter embeds "
            "the tokens itself, after its virtual tokens"
        )
    inputs.pop("task_ids", None)
    _drop(inputs, "position_ids", label)
    _drop(inputs, "token_type_ids", label)
    if config.task_type == TaskType.CAUSAL_LM:
        return inputs  # the virtual tokens go in step by step: peftkit_prepare_generation_step
    if inputs.pop("encoder_outputs", None) is not None:
        warnings.warn(
            f"{label} ignores encoder_outputs passed to generate() (as PEFT does): it runs the encoder "
            "on its virtual tokens and input_ids",
            UserWarning,
            stacklevel=3,
        )
    inputs["inputs_embeds"] = _embed_with_prompt(peft_model, config, module, inputs.pop("input_ids"), None)
    if inputs.get("attention_mask") is not None:
        inputs["attention_mask"] = _ones_before(inputs["attention_mask"], config.num_virtual_tokens)
    return inputs


def _cache_length(cache: Any) -> int:
    if isinstance(cache, (tuple, list)):  # the legacy cache format
        return cache[0][0].shape[-2]
    return cache.get_seq_length()


def _step_mask(mask: Any, label: str) -> torch.Tensor:
    if isinstance(mask, dict):  # one mask per attention kind
        if len(mask) != 1:
            raise ValueError(
                f"{label} can extend one attention mask per generation step, got {len(mask)} "
                f"({', '.join(sorted(mask))})"
            )
        mask = next(iter(mask.values()))
    if mask.dim() != 2:
        raise ValueError(
            f"{label} can extend a 2D attention mask, got a {mask.dim()}D one: generate with the default "
            "dynamic cache (not a static or other compilable cache)"
        )
    return mask


def prepare_generation_step(
    peft_model, config: Any, module: Any, model_inputs: dict, label: str
) -> dict | None:
    """One decoding step's model inputs (``peftkit_prepare_generation_step``); None to leave them."""
    if config.task_type != TaskType.CAUSAL_LM:
        return None
    inputs = dict(model_inputs)
    cache = inputs.get("past_key_values")
    input_ids = inputs["input_ids"]
    if cache is not None and _cache_length(cache) >= input_ids.shape[1]:
        # the cache holds the rest, virtual tokens included
        input_ids = inputs["input_ids"] = input_ids[:, -1:]
    if inputs.get("attention_mask") is not None:
        inputs["attention_mask"] = _ones_before(
            _step_mask(inputs["attention_mask"], label), config.num_virtual_tokens
        )
    # generate() makes position_ids from the mask without the virtual tokens: let the model count instead.
    _drop(inputs, "position_ids", label, warn=False)
    _drop(inputs, "token_type_ids", label, warn=False)
    inputs.pop("cache_position", None)  # older transformers: the model recounts it from inputs_embeds
    if cache is None or _cache_length(cache) == 0:
        inputs["inputs_embeds"] = _embed_with_prompt(peft_model, config, module, input_ids, None)
        inputs["input_ids"] = None
    return inputs


def input_hooks(method: str, label: str) -> tuple:
    """The three per-method hooks that place a method's virtual tokens, as this module does, for a plugin
    to bind under their hook names::

        peftkit_transform_inputs, peftkit_prepare_generation, peftkit_prepare_generation_step = (
            virtual_tokens.input_hooks(METHOD, LABEL)
        )

    The adapter's prompt module is ``peft_model.prompt_modules[adapter_name]``.
    """

    def peftkit_transform_inputs(peft_model, config, adapter_name, inputs):
        module = peft_model.prompt_modules[adapter_name]
        return prepend_virtual_tokens(peft_model, config, module, inputs, label)

    def peftkit_prepare_generation(peft_model, config, adapter_name, inputs):
        return prepare_generation(peft_model, config, peft_model.prompt_modules[adapter_name], inputs, label)

    def peftkit_prepare_generation_step(peft_model, config, adapter_name, model_inputs):
        module = peft_model.prompt_modules[adapter_name]
        return prepare_generation_step(peft_model, config, module, model_inputs, label)

    hooks = (peftkit_transform_inputs, peftkit_prepare_generation, peftkit_prepare_generation_step)
    return tuple(method_impl(method)(hook) for hook in hooks)
