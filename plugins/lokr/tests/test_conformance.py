"""LoKr against peftkit's conformance kit: Linear (Llama, BERT, plain) and Conv1d (plain) layers."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_lokr import LoKrConfig


class TestLoKrConformance(ConformanceSuite):
    method = "lokr"
    # GPT-2's transformers Conv1D is left out on purpose: PEFT's LoKr cannot adapt it, so neither does this one.
    model_kinds = ("llama", "bert", "plain")

    def make_config(self, draw, case):
        targets = draw(
            st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=3), label="linear targets"
        )
        if case.conv_targets:
            targets |= draw(st.sets(st.sampled_from(case.conv_targets), max_size=1), label="conv targets")
        rank_pattern = {}
        if draw(st.booleans(), label="rank_pattern"):
            rank_pattern = {
                draw(st.sampled_from(sorted(targets)), label="rank_pattern target"): draw(st.integers(1, 16))
            }
        return LoKrConfig(
            r=draw(st.integers(1, 8), label="r"),
            alpha=draw(st.sampled_from([1, 4, 8, 16]), label="alpha"),
            decompose_both=draw(st.booleans(), label="decompose_both"),
            decompose_factor=draw(st.sampled_from([-1, 2, 4]), label="decompose_factor"),
            use_effective_conv2d=draw(st.booleans(), label="use_effective_conv2d"),
            init_weights=draw(st.sampled_from([True, "lycoris"]), label="init_weights"),
            # module_dropout stays 0: skipping every adapted layer in the training-step property's one
            # pass would leave no gradient to check
            rank_dropout=draw(st.sampled_from([0.0, 0.1]), label="rank_dropout"),
            rank_dropout_scale=draw(st.booleans(), label="rank_dropout_scale"),
            target_modules=sorted(targets),
            rank_pattern=rank_pattern,
            task_type=case.task_type,
        )
