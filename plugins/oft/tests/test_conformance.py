"""OFT against peftkit's conformance kit: nn.Linear (Llama, BERT, plain) and transformers' Conv1D (GPT-2)."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_oft import OFTConfig


class TestOFTConformance(ConformanceSuite):
    method = "oft"
    model_kinds = ("llama", "gpt2", "bert", "plain")

    def make_config(self, draw, case):
        targets = sorted(
            draw(st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=4), label="targets")
        )
        if draw(st.booleans(), label="size by oft_block_size"):
            sizing = dict(oft_block_size=draw(st.sampled_from([2, 4, 8]), label="oft_block_size"))
        else:
            sizing = dict(r=draw(st.sampled_from([1, 2, 4]), label="r"), oft_block_size=0)
        neumann = draw(st.booleans(), label="use_cayley_neumann")
        return OFTConfig(
            target_modules=targets,
            **sizing,
            block_share=draw(st.booleans(), label="block_share"),
            use_cayley_neumann=neumann,
            num_cayley_neumann_terms=draw(st.integers(2, 6), label="terms") if neumann else 5,
            # a wide radius: the kit's drawn parameters stay inside it, so the constraint does not undo them
            coft=draw(st.booleans(), label="coft"),
            eps=10.0,
            task_type=case.task_type,
        )
