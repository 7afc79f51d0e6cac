"""Prompt tuning against peftkit's conformance kit: not mergeable, one adapter active at a time, and not the
identity at init (virtual tokens change every output)."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_prompt_tuning import PromptTuningConfig


class TestPromptTuningConformance(ConformanceSuite):
    method = "prompt_tuning"
    model_kinds = ("llama", "gpt2", "bert")
    identity_at_init = False

    def make_config(self, draw, case):
        return PromptTuningConfig(
            task_type=case.task_type,
            num_virtual_tokens=draw(st.integers(1, 6), label="num_virtual_tokens"),
            prompt_tuning_init=draw(st.sampled_from(["RANDOM", "SAMPLE_VOCAB"]), label="prompt_tuning_init"),
        )
