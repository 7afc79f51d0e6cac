"""LoHa against peftkit's conformance kit: Linear (Llama, BERT, plain) and Conv1d (plain) layers.

GPT-2 is left out: its layers are transformers' Conv1D, which PEFT's LoHa does not adapt (nor does this
plugin, so that every adapter it saves loads in PEFT).
"""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_loha import LoHaConfig


class TestLoHaConformance(ConformanceSuite):
    method = "loha"
    model_kinds = ("llama", "bert", "plain")
    # ΔW's entries are products of four adapter values (std s each): about s⁴ · alpha, where LoRA's are
    # about s² · alpha / √r. The kit's stds (made for LoRA) would give LoHa deltas thousands of times
    # smaller, which float32 draws then discard as having no effect; these give deltas of LoRA's sizes
    # under the kit's stds (float32: large, so a wrong merge shows; low precision: a trained adapter's size).
    weight_scales = {
        "float32": (0.2, 0.3, 0.5),
        "bfloat16": (0.1, 0.15, 0.2),
        "float16": (0.1, 0.15, 0.2),
    }

    def make_config(self, draw, case):
        targets = draw(
            st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=3), label="linear targets"
        )
        if case.conv_targets:
            targets |= draw(st.sets(st.sampled_from(case.conv_targets), max_size=1), label="conv targets")
        patterns = {}
        for field in ("rank_pattern", "alpha_pattern"):
            if draw(st.booleans(), label=field):
                target = draw(st.sampled_from(sorted(targets)), label=f"{field} target")
                patterns[field] = {target: draw(st.integers(1, 6), label=f"{field} value")}
        return LoHaConfig(
            r=draw(st.integers(1, 8), label="r"),
            alpha=draw(st.sampled_from([1, 4, 8, 16]), label="alpha"),
            # module_dropout is left at 0: it may skip every adapted layer of a training step, which the
            # kit's training property would read as no gradient reaching the adapter
            rank_dropout=draw(st.sampled_from([0.0, 0.1]), label="rank_dropout"),
            use_effective_conv2d=draw(st.booleans(), label="use_effective_conv2d"),
            target_modules=sorted(targets),
            task_type=case.task_type,
            **patterns,
        )
