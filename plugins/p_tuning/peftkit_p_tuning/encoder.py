"""P-tuning's prompt encoder: the virtual tokens are the output of a small network over trained embeddings.

With ``T = num_virtual_tokens * num_transformer_submodules`` embeddings ``E`` (``T × D``, ``D`` the
model's embedding width) and ``h = encoder_hidden_size``::

    MLP:   P = W₃ relu(W₂ relu(W₁ E + b₁) + b₂) + b₃       D -> h -> h -> D
    LSTM:  H = BiLSTM(E)                                    the T embeddings as one sequence, T × 2h
           P = W₂ relu(W₁ H + b₁) + b₂                      2h -> 2h -> D

``P`` goes before the input embeddings as prompt tuning places its virtual tokens. Only ``P`` is
saved (``prompt_embeddings``); a loaded adapter holds ``P`` directly, without the encoder.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from peftkit_p_tuning.config import PromptEncoderConfig


class PromptEncoder(nn.Module):
    """One adapter's virtual tokens: ``embedding`` through ``lstm_head`` and ``mlp_head`` (PEFT's names),
    or ``embedding.weight`` directly when built without the encoder (a loaded adapter).

    ``word_embeddings_path`` names the base model's word-embedding module, which embeds the real tokens.
    """

    def __init__(self, config: PromptEncoderConfig, word_embeddings_path: str, with_encoder: bool) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        width, hidden = config.token_dim, config.encoder_hidden_size
        self.word_embeddings_path = word_embeddings_path
        self.embedding = nn.Embedding(total, width)
        self.lstm_head = None
        self.mlp_head = None
        self.lstm_layers, self.lstm_dropout = config.encoder_num_layers, config.encoder_dropout
        self._remember_lstm_weights()
        if not with_encoder:
            return
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=width,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width)
            )
            self._remember_lstm_weights()
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(width, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, width),
            )

    def _remember_lstm_weights(self) -> None:
        """The LSTM's parameters by name, kept outside the module tree: torch.compile refuses to trace
        anything that touches an ``nn.LSTM`` module, its parameters included, but traces these."""
        weights = dict(self.lstm_head.named_parameters()) if self.lstm_head is not None else None
        self.__dict__["_lstm_weights"] = weights

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .to_empty() may make new parameters
        applied = super()._apply(fn, *args, **kwargs)
        self._remember_lstm_weights()
        return applied

    def virtual_tokens(self) -> torch.Tensor:
        """``P``: ``(total_virtual_tokens, token_dim)``.

        The encoder runs in its own dtype with ``torch.autocast`` off: it is a few small products, run
        once per forward, and torch's CPU LSTM has no float16 kernel (under float16 autocast it fails
        with "could not create a primitive descriptor for the LSTM forward propagation primitive")."""
        if self.mlp_head is None:
            return self.embedding.weight
        device_type = self.embedding.weight.device.type
        with (
            torch.autocast(device_type, enabled=False)
            # torch 2.11's dynamo cannot trace is_autocast_available; compiled code runs where autocast is
            if torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
            else nullcontext()
        ):
            sequence = self.embedding.weight.unsqueeze(0)  # the virtual tokens form one sequence
            weights = self.__dict__["_lstm_weights"]
            if weights is not None and torch.compiler.is_compiling():
                # torch.compile cannot trace nn.LSTM (a graph break): compiled, its equations run instead
                dropout = self.lstm_dropout if self.training else 0.0
                sequence = unrolled_lstm(weights, sequence, self.lstm_layers, dropout)
            elif weights is not None:
                sequence = self.lstm_head(sequence)[0]
            return self.mlp_head(sequence)[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """The virtual tokens for a batch: ``(batch_size, total_virtual_tokens, token_dim)``."""
        return self.virtual_tokens().unsqueeze(0).expand(batch_size, -1, -1)


def unrolled_lstm(
    weights: dict[str, torch.Tensor], sequence: torch.Tensor, num_layers: int, dropout: float = 0.0
) -> torch.Tensor:
    """What ``lstm(sequence)[0]`` computes, written as its equations, one step per token: for a
    batch-first, bidirectional ``nn.LSTM`` of ``num_layers`` layers whose parameters are ``weights``
    (by their names in the LSTM), from zero states, with ``dropout`` between layers.

    Each step, from the input x and the last state (h, c), with the layer's weights in torch's order
    (input, forget, cell, output gates)::

        i, f, g, o = σ, σ, tanh, σ  of  W_ih x + b_ih + W_hh h + b_hh
        c = f · c + i · g,   h = o · tanh(c)

    The reverse direction runs the same over the tokens from the last; its outputs stand beside the
    forward direction's. Loops over the (few) virtual tokens, which torch.compile unrolls.
    """
    layer_input = sequence
    for layer in range(num_layers):
        directions = []
        for suffix in ("", "_reverse"):
            weight_ih, weight_hh = (
                weights[f"weight_ih_l{layer}{suffix}"],
                weights[f"weight_hh_l{layer}{suffix}"],
            )
            bias = weights[f"bias_ih_l{layer}{suffix}"] + weights[f"bias_hh_l{layer}{suffix}"]
            inputs = layer_input @ weight_ih.T + bias  # (batch, tokens, 4 · hidden): every step's x part
            steps = range(inputs.shape[1] - 1, -1, -1) if suffix else range(inputs.shape[1])
            h = inputs.new_zeros(inputs.shape[0], weight_hh.shape[1])
            c = torch.zeros_like(h)
            outputs = [h] * inputs.shape[1]
            for t in steps:
                i, f, g, o = (inputs[:, t] + h @ weight_hh.T).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs[t] = h
            directions.append(torch.stack(outputs, dim=1))
        layer_input = torch.cat(directions, dim=-1)
        if layer < num_layers - 1 and dropout > 0:
            layer_input = nn.functional.dropout(layer_input, dropout, training=True)
    return layer_input
