"""BOFT against peftkit's conformance kit: nn.Linear (Llama, BERT, plain) and transformers' Conv1D (GPT-2)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit.testing.suite import adapter_parameters
from peftkit_boft import BOFTConfig


class TestBOFTConformance(ConformanceSuite):
    method = "boft"
    model_kinds = ("llama", "gpt2", "bert", "plain")

    def make_config(self, draw, case):
        targets = sorted(
            draw(st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=4), label="targets")
        )
        # the kit's layers have multiples of 8 input features: these layouts fit every one (a third
        # factor needs 2 x 2**2 features per butterfly span, and blocks of even size)
        factors = draw(st.integers(1, 3), label="boft_n_butterfly_factor")
        choices = [2] if factors == 3 else [2, 4]
        if draw(st.booleans(), label="size by boft_block_size"):
            sizing = dict(boft_block_size=draw(st.sampled_from(choices), label="boft_block_size"))
        else:
            sizing = dict(boft_block_size=0, boft_block_num=draw(st.sampled_from([4] if factors == 3 else [2, 4]), label="blocks"))
        return BOFTConfig(
            target_modules=targets,
            boft_n_butterfly_factor=factors,
            **sizing,
            bias=draw(st.sampled_from(["none", "boft_only"]), label="bias"),
            task_type=case.task_type,
        )

    def randomize_adapter(self, peft_model, adapter_name, generator, scale):
        """The kit's draw around 0, then the output scales moved to around 1, as training leaves them."""
        super().randomize_adapter(peft_model, adapter_name, generator, scale)
        with torch.no_grad():
            for name, param in adapter_parameters(peft_model, adapter_name).values():
                if name.endswith("boft_s"):
                    param.add_(1.0)
