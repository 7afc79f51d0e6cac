"""P-tuning against peftkit's conformance kit: not mergeable, one adapter active at a time, and not the
identity at init (virtual tokens change every output)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_p_tuning import PromptEncoderConfig


class TestPTuningConformance(ConformanceSuite):
    method = "p_tuning"
    model_kinds = ("llama", "gpt2", "bert")
    identity_at_init = False

    def make_config(self, draw, case):
        return PromptEncoderConfig(
            task_type=case.task_type,
            num_virtual_tokens=draw(st.integers(1, 6), label="num_virtual_tokens"),
            encoder_reparameterization_type=draw(st.sampled_from(["MLP", "LSTM"]), label="encoder"),
            encoder_hidden_size=draw(st.sampled_from([None, 8]), label="encoder_hidden_size"),
        )

    def expected_saved_tensors(self, peft_model, adapter_name):
        # The file holds the encoder's output, not the embeddings and encoder that compute it while
        # training (beside the task head's copy, for classification).
        tensors = super().expected_saved_tensors(peft_model, adapter_name)
        tensors = {name: t for name, t in tensors.items() if not name.startswith("prompt_modules.")}
        with torch.no_grad():  # as saving computes it (an LSTM rounds differently with autograd on)
            virtual_tokens = peft_model.prompt_modules[adapter_name].virtual_tokens()
        return tensors | {"prompt_embeddings": virtual_tokens}
