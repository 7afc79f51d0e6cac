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
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(width, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, width),
            )

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
            if torch.amp.is_autocast_available(device_type)
            else nullcontext()
        ):
            sequence = self.embedding.weight.unsqueeze(0)  # the virtual tokens form one sequence
            if self.lstm_head is not None:
                sequence = self.lstm_head(sequence)[0]
            return self.mlp_head(sequence)[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """The virtual tokens for a batch: ``(batch_size, total_virtual_tokens, token_dim)``."""
        return self.virtual_tokens().unsqueeze(0).expand(batch_size, -1, -1)
