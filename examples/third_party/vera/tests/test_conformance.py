"""VeRA against peftkit's conformance kit: nn.Linear (Llama) and GPT-2's transposed Conv1D."""

from __future__ import annotations

from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_vera import VeraConfig


class TestVeraConformance(ConformanceSuite):
    method = "vera"
    model_kinds = ("llama", "gpt2")

    def make_config(self, draw, case):
        targets = draw(st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=3), label="targets")
        return VeraConfig(
            r=draw(st.integers(1, 8), label="r"),
            target_modules=sorted(targets),
            projection_prng_key=draw(st.integers(0, 3), label="projection_prng_key"),
            d_initial=draw(st.sampled_from([0.1, 1.0]), label="d_initial"),
            vera_dropout=draw(st.sampled_from([0.0, 0.1]), label="vera_dropout"),
            save_projection=draw(st.booleans(), label="save_projection"),
            task_type=case.task_type,
        )

    def expected_saved_tensors(self, peft_model, adapter_name):
        # the file holds the shared frozen A and B too, when the config says to save them
        expected = super().expected_saved_tensors(peft_model, adapter_name)
        if peft_model.peft_config[adapter_name].save_projection:
            layer = next(
                m for m in peft_model.base_model.model.modules() if adapter_name in getattr(m, "vera_projections", {})
            )
            projections = layer.vera_projections[adapter_name]
            expected.update({"vera_A": projections.vera_A, "vera_B": projections.vera_B})
        return expected
