"""The prompt module, and what it needs from the base model: its word embeddings and its shape."""

from __future__ import annotations

import math
from typing import Any

import torch
from peftkit.errors import ConfigError
from torch import nn

from peftkit_prompt_tuning.config import PromptTuningConfig


class PromptEmbedding(nn.Module):
    """The virtual tokens of one adapter: ``embedding.weight`` holds one row per virtual token.

    ``word_embeddings_path`` names the base model's word-embedding module (relative to the base model),
    which embeds the real tokens that the virtual ones are placed before.
    """

    def __init__(self, total_virtual_tokens: int, token_dim: int, word_embeddings_path: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(total_virtual_tokens, token_dim)
        self.word_embeddings_path = word_embeddings_path

    def forward(self, batch_size: int) -> torch.Tensor:
        """The virtual tokens for a batch: ``(batch_size, total_virtual_tokens, token_dim)``."""
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


# --- the base model's shape ------------------------------------------------------------------------
# For each field, the model-config keys PEFT reads it from, in PEFT's order.
_SHAPE_KEYS = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


def _config_dict(model_config: Any) -> dict[str, Any]:
    if model_config is None:
        return {}
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    text = data.get("text_config")  # a vision-language model: its language model decides
    return text if isinstance(text, dict) else data


def fill_model_shape(config: PromptTuningConfig, model: nn.Module) -> None:
    """Set the fields left None from the base model's config, as PEFT does when it adds the adapter."""
    model_config = getattr(model, "config", None)
    data = _config_dict(model_config)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    for field_name, keys in _SHAPE_KEYS.items():
        if getattr(config, field_name) is not None:
            continue
        value = None
        if field_name == "num_layers" and hasattr(model_config, "num_hidden_layers"):
            value = model_config.num_hidden_layers
        for key in keys:
            if value is None and key in data:
                value = data[key]
        if value is None:
            raise ConfigError(
                f"{type(config).__name__}.{field_name} is None and the base model's config has none of "
                f"{', '.join(keys)} to take it from; set {field_name} in the config"
            )
        setattr(config, field_name, value)


# --- the word embeddings ---------------------------------------------------------------------------
def _vocab_size(model: nn.Module) -> int | None:
    model_config = getattr(model, "config", None)
    if model_config is None:
        return None
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    return getattr(model_config, "vocab_size", None)


def find_word_embeddings(model: nn.Module) -> str:
    """The path of the base model's word embeddings, found as PEFT finds them.

    First ``embeddings.word_embeddings`` (BERT-like encoders used bare); otherwise, inside the first
    child that is a transformers model (the backbone, or the model itself), the module of the first
    parameter with ``vocab_size`` rows.
    """
    try:
        model.get_submodule("embeddings.word_embeddings")
        return "embeddings.word_embeddings"
    except AttributeError:
        pass
    from transformers import PreTrainedModel

    prefix, backbone = "", model
    for name, child in model.named_children():
        if isinstance(child, PreTrainedModel):
            prefix, backbone = name + ".", child
            break
    vocab_size = _vocab_size(model)
    if vocab_size is not None:
        for name, param in backbone.named_parameters():
            if param.shape[0] == vocab_size:
                return prefix + name.replace(".weight", "")
    raise ConfigError(
        f"prompt tuning found no word embeddings in this {type(model).__name__}: it looks for the module "
        "'embeddings.word_embeddings' or a parameter with config.vocab_size rows, as PEFT does"
    )


# --- the first values of the virtual tokens --------------------------------------------------------
def initial_token_ids(config: PromptTuningConfig, total: int, vocab_size: int) -> torch.Tensor | None:
    """The tokens whose word embeddings start the virtual tokens; None for a random start.

    A new adapter only: a loaded one (``inference_mode``) gets its values from the file, as in PEFT.
    """
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return None
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (total,), dtype=torch.long)
    ids = _text_token_ids(config)
    if not ids:
        raise ConfigError(
            f"{type(config).__name__}.prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens "
            f"with the tokenizer {config.tokenizer_name_or_path!r}; give a text that does"
        )
    ids = (ids * math.ceil(total / len(ids)))[:total]  # repeat, then cut, to the number of virtual tokens
    too_big = [i for i in ids if not 0 <= i < vocab_size]
    if too_big:
        raise ConfigError(
            f"the tokenizer {config.tokenizer_name_or_path!r} gives token id {too_big[0]}, outside the base "
            f"model's {vocab_size} word embeddings: tokenizer_name_or_path must name the base model's tokenizer"
        )
    return torch.tensor(ids, dtype=torch.long)


def _text_token_ids(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    # As PEFT: an adapter config must never run code from a tokenizer repository.
    kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    return list(tokenizer(config.prompt_tuning_init_text)["input_ids"])


def build_prompt_embedding(config: PromptTuningConfig, model: nn.Module) -> PromptEmbedding:
    """Make an adapter's prompt module for ``model`` (the base model), with its first values."""
    path = find_word_embeddings(model)
    word_embeddings = model.get_submodule(path)
    weight = word_embeddings.weight
    if weight.shape[1] != config.token_dim:
        raise ConfigError(
            f"{type(config).__name__}.token_dim must be the width of the model's word embeddings "
            f"({weight.shape[1]}), got {config.token_dim}"
        )
    total = config.num_virtual_tokens * config.num_transformer_submodules
    module = PromptEmbedding(total, config.token_dim, path)
    ids = initial_token_ids(config, total, weight.shape[0])
    if ids is not None:
        with torch.no_grad():
            module.embedding.weight.copy_(word_embeddings(ids.to(weight.device)).float())
    return module.to(weight.device)
