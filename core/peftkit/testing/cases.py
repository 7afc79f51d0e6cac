"""The models, dtypes and devices the conformance kit draws its cases from."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.testing import models

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class ModelKind:
    """One architecture the kit can build in any of its hidden sizes.

    ``build(hidden_size, seed)`` returns the model in float32, on the CPU, in eval mode; its forward
    takes ``input_ids`` (and nothing else is required). The ``*_targets`` are the last path component
    of layers a config may target (each name matches every such layer in the model).
    """

    name: str
    description: str
    build: Callable[[int, int], nn.Module]
    hidden_sizes: tuple[int, ...]
    linear_targets: tuple[str, ...]
    embedding_targets: tuple[str, ...] = ()
    conv_targets: tuple[str, ...] = ()
    task_type: str | None = None
    vocab_size: int = 128


MODEL_KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind(
            name="llama",
            description="Llama-shaped causal LM (nn.Linear, grouped-query attention, untied embeddings)",
            build=lambda hidden, seed: models.tiny_llama(seed=seed, hidden_size=hidden),
            hidden_sizes=(16, 24, 32, 48),
            linear_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            embedding_targets=("embed_tokens",),
            task_type="CAUSAL_LM",
        ),
        ModelKind(
            name="gpt2",
            description="GPT-2-shaped causal LM (transformers' Conv1D; the token embedding is tied to lm_head)",
            build=lambda hidden, seed: models.tiny_gpt2(seed=seed, n_embd=hidden),
            hidden_sizes=(16, 24, 32, 48),
            linear_targets=("c_attn", "c_proj", "c_fc"),
            # wte is tied to lm_head: a merged delta on it would change the output head too.
            embedding_targets=("wpe",),
            task_type="CAUSAL_LM",
        ),
        ModelKind(
            name="bert",
            description="BERT-shaped encoder with a sequence-classification head (SEQ_CLS: trains 'classifier')",
            build=lambda hidden, seed: models.tiny_bert(seed=seed, hidden_size=hidden),
            hidden_sizes=(16, 32, 48),
            linear_targets=("query", "key", "value", "dense"),
            embedding_targets=("word_embeddings", "position_embeddings"),
            task_type="SEQ_CLS",
        ),
        ModelKind(
            name="plain",
            description="a plain nn.Module: Embedding, Conv1d, Linear layers (no transformers)",
            build=lambda hidden, seed: models.tiny_plain(seed=seed, hidden_size=hidden),
            hidden_sizes=(8, 16, 32),
            linear_targets=("fc1", "fc2", "head"),
            embedding_targets=("embed",),
            conv_targets=("conv",),
        ),
    )
}


@dataclass(frozen=True)
class ModelCase:
    """One drawn model: what ``make_config`` gets to build a config that targets it.

    ``kind`` names the architecture (a key of :data:`MODEL_KINDS`); ``linear_targets``,
    ``embedding_targets`` and ``conv_targets`` are layer names it has; ``task_type`` is the PEFT task
    type that fits its head (``"CAUSAL_LM"``, ``"SEQ_CLS"`` or None): pass it on to the config.
    """

    kind: str
    hidden_size: int
    dtype: str
    device: str
    seed: int
    vocab_size: int
    task_type: str | None
    linear_targets: tuple[str, ...]
    embedding_targets: tuple[str, ...]
    conv_targets: tuple[str, ...]

    @classmethod
    def of(cls, kind: str, hidden_size: int, dtype: str, device: str, seed: int = 0) -> ModelCase:
        spec = MODEL_KINDS[kind]
        return cls(
            kind=kind,
            hidden_size=hidden_size,
            dtype=dtype,
            device=device,
            seed=seed,
            vocab_size=spec.vocab_size,
            task_type=spec.task_type,
            linear_targets=spec.linear_targets,
            embedding_targets=spec.embedding_targets,
            conv_targets=spec.conv_targets,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def __str__(self) -> str:
        return f"{self.kind}(hidden={self.hidden_size}, seed={self.seed}) in {self.dtype} on {self.device}"


@functools.lru_cache(maxsize=64)
def _template(kind: str, hidden_size: int, seed: int) -> nn.Module:
    return MODEL_KINDS[kind].build(hidden_size, seed)


def build_model(case: ModelCase) -> nn.Module:
    """A fresh model for the case (a copy of a cached template: building is the slow part)."""
    model = copy.deepcopy(_template(case.kind, case.hidden_size, case.seed))
    return model.to(device=case.device, dtype=case.torch_dtype).eval()


def make_inputs(case: ModelCase, batch: int, seq: int, seed: int) -> dict[str, Any]:
    """Keyword arguments for one forward: random token ids (never the padding id 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, case.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": input_ids.to(case.device)}


@functools.cache
def supported_dtypes(device: str) -> tuple[str, ...]:
    """The dtypes whose forward and backward the device runs (float16 on old CPUs may not)."""
    out = []
    for name, dtype in DTYPES.items():
        try:
            _probe(device, dtype)
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        out.append(name)
    return tuple(out)


def _probe(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layers = nn.ModuleDict(
        {
            "embed": nn.Embedding(8, 8),
            "conv": nn.Conv1d(8, 8, 3, padding=1),
            "linear": nn.Linear(8, 8),
            "norm": nn.LayerNorm(8),
        }
    ).to(device=device, dtype=dtype)
    h = layers["embed"](torch.tensor([[1, 2, 3]], device=device))
    h = h + layers["conv"](h.transpose(1, 2)).transpose(1, 2)
    h = torch.softmax(layers["norm"](layers["linear"](h)) @ h.transpose(1, 2), dim=-1)
    h = nn.functional.scaled_dot_product_attention(h, h, h)
    h.float().square().sum().backward()


@functools.cache
def autocast_dtypes(device: str) -> tuple[str, ...]:
    """The low-precision dtypes ``torch.autocast`` runs a forward and backward in on the device."""
    if not torch.amp.is_autocast_available(device):
        return ()
    out = []
    for name in ("bfloat16", "float16"):
        try:
            with torch.autocast(device, dtype=DTYPES[name]):
                _probe(device, torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        out.append(name)
    return tuple(out)
