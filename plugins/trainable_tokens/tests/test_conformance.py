"""Trainable tokens against peftkit's conformance kit: every property, compile and autocast included.

The kit's inputs are random token ids, and only the adapter's rows act: so each input sequence starts
with token 2 (a row of the first adapter) and then has token 3 (a row of the second), and the adapters
draw the rest of their rows at random, the first from the even ids, the second from the odd ones, as two
adapters that act together must hold disjoint rows.
"""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.adapter_layer import adapter_layers
from peftkit.testing import ConformanceSuite
from peftkit.testing.cases import make_inputs
from peftkit_trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

FIRST_ROW, SECOND_ROW = 2, 3


def _rows(draw, case, parity: int, always: int, label: str) -> list[int]:
    ids = st.integers(0, case.vocab_size // 2 - 1).map(lambda i: 2 * i + parity)
    return sorted(draw(st.sets(ids, max_size=24), label=label) | {always})


class TestTrainableTokensConformance(ConformanceSuite):
    method = "trainable_tokens"
    # llama: an untied embed_tokens; gpt2: wte tied to lm_head, so the head's layer shares the rows
    model_kinds = ("llama", "gpt2")

    def make_config(self, draw, case):
        rows = _rows(draw, case, 0, FIRST_ROW, "token_indices")
        # None: PEFT's default, the model's input embedding
        name = "embed_tokens" if case.kind == "llama" else "wte"
        target = draw(st.sampled_from([None, [name]]), label="target")
        return TrainableTokensConfig(token_indices=rows, target_modules=target, task_type=case.task_type)

    def second_config(self, draw, case):
        rows = _rows(draw, case, 1, SECOND_ROW, "second adapter's token_indices")
        return TrainableTokensConfig(token_indices=rows, task_type=case.task_type)

    def expected_saved_tensors(self, peft_model, adapter_name):
        # PEFT's format: an output head tied to the embedding saves the same rows under its own key too
        expected = super().expected_saved_tensors(peft_model, adapter_name)
        for path, layer in adapter_layers(peft_model.base_model.model):
            if (
                isinstance(layer, TrainableTokensLayer)
                and layer.tied_to is not None
                and layer.holds(adapter_name)
            ):
                expected[f"{path}.trainable_tokens_delta"] = layer.trainable_tokens_delta[adapter_name]
        return expected

    def make_inputs(self, case, batch, length, seed):
        inputs = make_inputs(case, batch, length, seed)
        inputs["input_ids"][:, 0] = FIRST_ROW
        inputs["input_ids"][:, -1] = SECOND_ROW if length > 1 else FIRST_ROW
        return inputs
