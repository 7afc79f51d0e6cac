"""BitFit against peftkit's conformance kit: Linear (BERT, plain), Conv1D (GPT-2) and Conv1d layers and
LayerNorm biases, with and without LayerNorm weight offsets. Llama is left out: its tiny model has no
bias anywhere."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_bitfit import BitFitConfig


class TestBitFitConformance(ConformanceSuite):
    method = "bitfit"
    model_kinds = ("gpt2", "bert", "plain")

    def make_config(self, draw, case):
        targets = None
        if draw(st.booleans(), label="name the targets"):
            # BERT's key bias alone cannot change any output (softmax ignores a shift shared by all keys),
            # so every drawn set holds at least one other layer
            effective = [name for name in case.linear_targets + case.conv_targets if name != "key"]
            targets = draw(st.sets(st.sampled_from(effective), min_size=1, max_size=3), label="targets")
            if "key" in case.linear_targets and draw(st.booleans(), label="with key"):
                targets.add("key")
            targets = sorted(targets)
        return BitFitConfig(
            target_modules=targets,
            train_layer_norm=draw(st.booleans(), label="train_layer_norm"),
            task_type=case.task_type,
        )
