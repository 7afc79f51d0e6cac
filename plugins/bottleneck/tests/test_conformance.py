"""Bottleneck adapters against peftkit's conformance kit: Llama, GPT-2 and BERT layouts, and a plain module
with named blocks. The kit checks that merging refuses with MergeNotSupportedError (mergeable=False)."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_bottleneck import BottleneckConfig
from peftkit_bottleneck.config import NON_LINEARITIES

# the plain model's feed-forward is fc2(act(fc1(h))) inside a residual; fc1 stands in for "attention"
PLAIN_BLOCKS = {"feedforward_modules": ["fc2"], "attention_modules": ["fc1"]}


class TestBottleneckConformance(ConformanceSuite):
    method = "bottleneck"
    model_kinds = ("llama", "gpt2", "bert", "plain")

    def make_config(self, draw, case):
        # BERT's parallel adapters wrap 'output' and sequential ones 'output.dense', which must not nest:
        # the kit's second adapter is drawn independently, so BERT draws sequential styles here (its
        # parallel style is tested in test_bottleneck_models.py). Likewise on decoders, where 'pfeiffer' with
        # original_ln_before=True wraps the whole decoder layer: the kit draws original_ln_before=False there
        # (the decoder-layer placement is tested in test_bottleneck_models.py).
        styles = ["houlsby", "pfeiffer"] + ([] if case.kind == "bert" else ["parallel"])
        style = draw(st.sampled_from(styles), label="style")
        names = {}
        if style == "parallel":  # the plain model has no norm before its feed-forward block to read at
            inputs = ["block_input"] if case.kind == "plain" else ["residual", "block_input"]
            names["parallel_input"] = draw(st.sampled_from(inputs), label="parallel_input")
        if case.kind == "plain":
            names["feedforward_modules"] = PLAIN_BLOCKS["feedforward_modules"]
            if style == "houlsby":
                names["attention_modules"] = PLAIN_BLOCKS["attention_modules"]
        return BottleneckConfig(
            style=style,
            reduction_factor=draw(st.sampled_from([1, 2, 4, 8]), label="reduction_factor"),
            non_linearity=draw(st.sampled_from(NON_LINEARITIES), label="non_linearity"),
            scaling=draw(st.sampled_from([0.5, 1.0, 4.0]), label="scaling"),
            dropout=draw(st.sampled_from([0.0, 0.1]), label="dropout"),
            original_ln_before=None if case.kind in ("bert", "plain") else False,
            task_type=case.task_type,
            **names,
        )
