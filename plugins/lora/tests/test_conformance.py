"""LoRA against peftkit's conformance kit: Linear (Llama, BERT, plain), Conv1D (GPT-2), Embedding and Conv1d layers."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_lora import LoraConfig


class TestLoraConformance(ConformanceSuite):
    method = "lora"
    model_kinds = ("llama", "gpt2", "bert", "plain")

    def make_config(self, draw, case):
        targets = draw(
            st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=3), label="linear targets"
        )
        others = case.embedding_targets + case.conv_targets
        if others:
            targets |= draw(st.sets(st.sampled_from(others), max_size=2), label="embedding and conv targets")
        r = draw(st.integers(1, 8), label="r")
        rank_pattern = {}
        if draw(st.booleans(), label="rank_pattern"):
            rank_pattern = {
                draw(st.sampled_from(sorted(targets)), label="rank_pattern target"): draw(st.integers(1, 4))
            }
        return LoraConfig(
            r=r,
            lora_alpha=draw(st.sampled_from([1, 4, 8, 16]), label="lora_alpha"),
            use_rslora=draw(st.booleans(), label="use_rslora"),
            use_dora=draw(st.booleans(), label="use_dora"),
            init_lora_weights=draw(st.sampled_from([True, "gaussian"]), label="init_lora_weights"),
            lora_dropout=draw(st.sampled_from([0.0, 0.1]), label="lora_dropout"),
            bias=draw(st.sampled_from(["none", "all", "lora_only"]), label="bias"),
            target_modules=sorted(targets),
            rank_pattern=rank_pattern,
            task_type=case.task_type,
        )
