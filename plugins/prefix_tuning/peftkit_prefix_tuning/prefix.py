"""The prefix: learned keys and values for every attention layer, and how they reach the model's KV cache.

With ``n = num_virtual_tokens``, ``L = num_layers``, ``H = num_attention_heads`` key/value heads and
``D = token_dim`` (the key/value width of one layer, ``H * head_dim``), the adapter holds a prefix
``P`` of shape ``(n, 2 * L * D)``::

    P = E                                  prefix_projection=False, E: (n, 2*L*D) trained directly
    P = W₂ tanh(W₁ E + b₁) + b₂            prefix_projection=True,  E: (n, D), W₁: D -> encoder_hidden_size,
                                                                    W₂: encoder_hidden_size -> 2*L*D

Row ``t`` of ``P`` holds virtual token ``t``'s key and value for every layer: for layer ``l`` the key is
block ``2l`` of width ``D`` and the value block ``2l + 1``, each split into ``H`` heads. Layer ``l``
then attends over ``[K_l(P); K_l(x)]`` and ``[V_l(P); V_l(x)]``: the prefix enters as the KV cache
of ``n`` earlier positions that every real token sees. The saved tensor ``prompt_embeddings`` is
``P`` itself, as PEFT saves it; a loaded adapter holds ``P`` directly (the MLP only shapes training).
"""

from __future__ import annotations

from typing import Any

import torch
from peftkit.errors import ConfigError
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from peftkit_prefix_tuning.config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """One adapter's prefix ``P``: ``embedding.weight`` directly, or an MLP of it (``transform``)."""

    def __init__(self, config: PrefixTuningConfig, projected: bool) -> None:
        super().__init__()
        width = 2 * config.num_layers * config.token_dim
        if projected:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            self.transform = None
        if config.init_weights == "zero":
            last = self.transform[-1] if projected else self.embedding
            for tensor in last.parameters():
                nn.init.zeros_(tensor)

    def forward(self) -> torch.Tensor:
        """The prefix ``P``: ``(num_virtual_tokens, 2 * num_layers * token_dim)``."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)


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


def fill_model_shape(config: PrefixTuningConfig, model: nn.Module) -> None:
    """Set the shape fields from the base model's config, as PEFT does when it adds the adapter.

    Fields left None are read from the config. Then, for grouped-query attention, the keys and values
    are narrower than the hidden states: ``token_dim`` becomes ``head_dim * num_key_value_heads`` and
    ``num_attention_heads`` becomes ``num_key_value_heads`` (PEFT does this whatever was set).
    """
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
        value = next((data[key] for key in keys if key in data), None) if value is None else value
        if value is None:
            raise ConfigError(
                f"{type(config).__name__}.{field_name} is None and the base model's config has none of "
                f"{', '.join(keys)} to take it from; set {field_name} in the config"
            )
        setattr(config, field_name, value)
    if "num_key_value_heads" in data:
        head_dim = data.get("head_dim") or config.token_dim // config.num_attention_heads
        config.num_attention_heads = data["num_key_value_heads"]
        config.token_dim = head_dim * config.num_attention_heads
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(
            f"{type(config).__name__}.token_dim ({config.token_dim}) must be a multiple of num_attention_heads "
            f"({config.num_attention_heads}) for this model"
        )


# --- the prefix as a KV cache ----------------------------------------------------------------------
def layer_key_values(prefix: torch.Tensor, config: PrefixTuningConfig, batch_size: int) -> list[tuple]:
    """Each layer's ``(key, value)``, both ``(batch, heads, num_virtual_tokens, head_dim)``."""
    heads = config.num_attention_heads
    blocks = prefix.view(config.num_virtual_tokens, 2 * config.num_layers, heads, config.token_dim // heads)
    blocks = blocks.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
    return [(blocks[2 * layer], blocks[2 * layer + 1]) for layer in range(config.num_layers)]


def decoder_source_layers(num_layers: int) -> list[int]:
    """For an encoder-decoder, which prefix block each decoder layer's self-attention reads.

    PEFT lays the prefix out twice over and hands the decoder one layer in two of the result
    (self-attention block ``2l mod L``), then drops the cross-attention half. Adapters trained in
    either library depend on that layout, so it is kept.
    """
    return [(2 * layer) % num_layers for layer in range(num_layers)]


def prefix_cache(module: PrefixEncoder, config: PrefixTuningConfig, batch_size: int, dtype: torch.dtype):
    """The prefix as the KV cache the model starts from: a DynamicCache, or for an encoder-decoder an
    EncoderDecoderCache whose decoder self-attention holds the prefix and whose cross-attention is empty.
    (The cache classes are imported with the module: torch 2.11's dynamo cannot trace an import of
    transformers' lazy module inside a compiled forward.)"""
    pairs = layer_key_values(module().to(dtype), config, batch_size)
    if config.num_transformer_submodules == 1:
        return DynamicCache(pairs)
    decoder_pairs = [pairs[source] for source in decoder_source_layers(config.num_layers)]
    return EncoderDecoderCache(DynamicCache(decoder_pairs), DynamicCache())
