"""LN tuning against peftkit's conformance kit: every property, compile and autocast included."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_ln_tuning import LNTuningConfig

# the norm layers of each model kind the kit draws
NORMS = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),  # LlamaRMSNorm: a weight only
    "gpt2": ("ln_1", "ln_2", "ln_f"),  # nn.LayerNorm: weight and bias
    "bert": ("LayerNorm",),  # nn.LayerNorm in the embeddings and every block
}


class TestLNTuningConformance(ConformanceSuite):
    method = "ln_tuning"
    model_kinds = tuple(NORMS)

    def make_config(self, draw, case):
        if draw(st.booleans(), label="architecture defaults") and case.kind != "bert":
            return LNTuningConfig(task_type=case.task_type)  # PEFT's default norms for the model_type
        targets = draw(st.sets(st.sampled_from(NORMS[case.kind]), min_size=1), label="targets")
        return LNTuningConfig(target_modules=sorted(targets), task_type=case.task_type)
