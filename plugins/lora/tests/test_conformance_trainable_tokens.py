"""LoRA with ``trainable_token_indices`` against the conformance kit: the LoRA layers and the embedding's
trainable rows together, on an untied (Llama) and a tied (GPT-2) embedding.

As in peftkit-trainable-tokens' suite, each input starts with a row of the first adapter and ends with a
row of the second, and the two adapters draw their other rows from the even and the odd ids (adapters
that act together must hold disjoint rows).
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit.testing.cases import make_inputs
from peftkit_lora import LoraConfig

pytest.importorskip(
    "peftkit_trainable_tokens", reason="trainable_token_indices needs peftkit-trainable-tokens"
)

FIRST_ROW, SECOND_ROW = 2, 3


def _rows(draw, case, parity: int, always: int, label: str) -> list[int]:
    ids = st.integers(0, case.vocab_size // 2 - 1).map(lambda i: 2 * i + parity)
    return sorted(draw(st.sets(ids, max_size=12), label=label) | {always})


class TestLoraTrainableTokensConformance(ConformanceSuite):
    method = "lora"
    model_kinds = ("llama", "gpt2")

    def _config(self, draw, case, rows, label):
        embedding = "embed_tokens" if case.kind == "llama" else "wte"
        indices = draw(st.sampled_from([rows, {embedding: rows}]), label=f"{label} form")
        return LoraConfig(
            r=draw(st.integers(1, 4), label=f"{label} r"),
            lora_alpha=draw(st.sampled_from([4, 8]), label=f"{label} lora_alpha"),
            init_lora_weights=draw(st.sampled_from([True, "gaussian"]), label=f"{label} init"),
            lora_dropout=draw(st.sampled_from([0.0, 0.1]), label=f"{label} lora_dropout"),
            target_modules=case.linear_targets[:1],
            trainable_token_indices=indices,
            task_type=case.task_type,
        )

    def make_config(self, draw, case):
        return self._config(draw, case, _rows(draw, case, 0, FIRST_ROW, "token rows"), "first")

    def second_config(self, draw, case):
        return self._config(draw, case, _rows(draw, case, 1, SECOND_ROW, "second token rows"), "second")

    def make_inputs(self, case, batch, length, seed):
        inputs = make_inputs(case, batch, length, seed)
        inputs["input_ids"][:, 0] = FIRST_ROW
        inputs["input_ids"][:, -1] = SECOND_ROW if length > 1 else FIRST_ROW
        return inputs
