"""AdaLoRA against peftkit's conformance kit: Linear (Llama, BERT, plain) and Conv1D (GPT-2) layers."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from peftkit.testing import ConformanceSuite
from peftkit_adalora import AdaLoraConfig, AdaLoraLayer


class TestAdaLoraConformance(ConformanceSuite):
    method = "adalora"
    model_kinds = ("llama", "gpt2", "bert", "plain")

    def make_config(self, draw, case):
        targets = draw(
            st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=3), label="linear targets"
        )
        init_r = draw(st.integers(1, 8), label="init_r")
        return AdaLoraConfig(
            init_r=init_r,
            target_r=draw(st.integers(1, init_r), label="target_r"),
            total_step=draw(st.integers(1, 100), label="total_step"),
            lora_alpha=draw(st.sampled_from([1, 8, 32]), label="lora_alpha"),
            lora_dropout=draw(st.sampled_from([0.0, 0.1]), label="lora_dropout"),
            bias=draw(st.sampled_from(["none", "all", "lora_only"]), label="bias"),
            target_modules=sorted(targets),
            task_type=case.task_type,
        )

    def second_config(self, draw, case):
        # PEFT allows one trainable AdaLoRA adapter per model (it owns the rank allocation): others are added
        # for inference, as PEFT requires
        return self.make_config(draw, case).replace(inference_mode=True)

    def randomize_adapter(self, peft_model, adapter_name, generator, scale):
        # ΔW = s · P Λ Q is a product of three factors. Drawn all with std `scale` (the kit's default), ΔW
        # would be cubic in the scale and barely move the outputs, so the merge properties would discard
        # most draws. Singular values redrawn with std 1 (P and Q keep std `scale`) give LoRA-sized deltas.
        super().randomize_adapter(peft_model, adapter_name, generator, scale)
        with torch.no_grad():
            for _, layer in peft_model.adapter_layers():
                if isinstance(layer, AdaLoraLayer) and layer.holds(adapter_name):
                    singular_values = layer.lora_E[adapter_name]
                    singular_values.copy_(torch.randn(singular_values.shape, generator=generator))
