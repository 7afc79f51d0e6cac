"""Tiny transformers models with random weights, built from their configs (no download), for tests."""

from __future__ import annotations

import torch


def tiny_llama(
    seed: int = 0, vocab_size: int = 128, hidden_size: int = 32, num_labels: int | None = None, **overrides
):
    """A Llama-shaped causal LM (grouped-query attention: 4 heads, 2 key/value heads), or a classifier with num_labels."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    settings.update(overrides)
    if num_labels is not None:
        return LlamaForSequenceClassification(LlamaConfig(num_labels=num_labels, **settings)).eval()
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 128, n_embd: int = 32, **overrides):
    """A GPT-2-shaped causal LM; its attention and MLP use transformers' Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    settings.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**settings)).eval()


def tiny_bert(
    seed: int = 0,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_labels: int = 2,
    task: str = "seq_cls",
    **overrides,
):
    """A BERT-shaped encoder with a sequence ("seq_cls") or token ("token_cls") classification head."""
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    settings.update(overrides)
    model_class = BertForTokenClassification if task == "token_cls" else BertForSequenceClassification
    return model_class(BertConfig(**settings)).eval()


def tiny_t5(seed: int = 0, vocab_size: int = 128, d_model: int = 32, **overrides):
    """A T5-shaped encoder-decoder LM."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return T5ForConditionalGeneration(T5Config(**settings)).eval()


def same_weights_copy(model):
    """A second instance of a model with identical weights (for comparing two libraries side by side)."""
    import copy

    return copy.deepcopy(model)


class TinyPlainModel(torch.nn.Module):
    """A plain ``nn.Module`` (no transformers): embedding, a 1-d convolution, an MLP and an output head.

    ``forward(input_ids)`` gives logits of shape ``(batch, seq, vocab_size)``. Its layers are named
    ``embed``, ``conv``, ``fc1``, ``fc2`` and ``head``.
    """

    def __init__(self, vocab_size: int = 128, hidden_size: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.conv = torch.nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1)
        self.fc1 = torch.nn.Linear(hidden_size, 2 * hidden_size)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(2 * hidden_size, hidden_size)
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.head = torch.nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.fc2(self.act(self.fc1(h)))
        return self.head(self.norm(h))


def tiny_plain(seed: int = 0, vocab_size: int = 128, hidden_size: int = 32):
    """A :class:`TinyPlainModel` with random weights, in eval mode."""
    torch.manual_seed(seed)
    return TinyPlainModel(vocab_size, hidden_size).eval()


def randomize_trainable(model, seed: int = 2, scale: float = 0.1):
    """Give every trainable tensor random values (normal, std ``scale``), as training would; returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model
