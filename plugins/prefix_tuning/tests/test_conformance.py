"""Prefix tuning against peftkit's conformance kit: not mergeable, one adapter active at a time, and not the
identity at init (the prefix changes every output)."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_prefix_tuning import PrefixTuningConfig


class TestPrefixTuningConformance(ConformanceSuite):
    method = "prefix_tuning"
    model_kinds = ("llama", "gpt2", "bert")
    identity_at_init = False

    def make_config(self, draw, case):
        projection = draw(st.booleans(), label="prefix_projection")
        return PrefixTuningConfig(
            task_type=case.task_type,
            num_virtual_tokens=draw(st.integers(1, 6), label="num_virtual_tokens"),
            prefix_projection=projection,
            encoder_hidden_size=draw(st.sampled_from([None, 8]), label="encoder_hidden_size"),
        )

    def expected_saved_tensors(self, peft_model, adapter_name):
        # The file holds the prefix itself, not the embedding and MLP that compute it while training
        # (beside the task head's copy, for classification).
        tensors = super().expected_saved_tensors(peft_model, adapter_name)
        tensors = {name: t for name, t in tensors.items() if not name.startswith("prompt_modules.")}
        return tensors | {"prompt_embeddings": peft_model.prompt_modules[adapter_name]().detach()}
