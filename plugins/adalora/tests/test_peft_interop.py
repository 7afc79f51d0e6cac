"""AdaLoRA adapters move between peftkit and PEFT with the same outputs, both ways, pruned or not."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from adalora_helpers import logits, randomize_adalora, train
from peftkit.testing.models import tiny_bert, tiny_gpt2, tiny_llama
from peftkit_adalora import AdaLoraConfig
from safetensors.torch import load_file

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")),
    "bert-seq-cls": (
        tiny_bert,
        dict(target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only"),
    ),
}
SCHEDULE = dict(
    task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2, lora_alpha=16
)


def assert_adapter_acts(model, base, expected):
    """The comparison means something only if the adapter moves the outputs far beyond the tolerance."""
    assert (expected - logits(base)).abs().max() > 1e-2


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, AdaLoraConfig(init_r=4, target_r=2, total_step=10, **kwargs))
    randomize_adalora(ours)
    expected = logits(ours)
    assert_adapter_acts(ours, pristine, expected)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, **kwargs))
    randomize_adalora(theirs)
    expected = logits(theirs)
    assert_adapter_acts(theirs, pristine, expected)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)


def test_pruned_peftkit_adapter_loads_in_peft_with_same_outputs(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, AdaLoraConfig(target_modules=["q_proj", "v_proj"], **SCHEDULE))
    train(ours, SCHEDULE["total_step"])
    rank_pattern = ours.peft_config["default"].rank_pattern
    kept = {key: sum(mask) for key, mask in rank_pattern.items()}
    assert sum(kept.values()) == 2 * 4 and min(kept.values()) < 6  # pruned to the budget
    expected = logits(ours)
    ours.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    for key, count in kept.items():
        path = "base_model.model." + key.removesuffix(".lora_E")
        assert saved[f"{path}.lora_E"].shape == (count, 1)
        assert saved[f"{path}.lora_A"].shape == (count, 32)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == rank_pattern

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


def test_peft_trained_and_pruned_adapter_loads_here_and_allocation_matches(tmp_path):
    """The same start and the same training give PEFT's ranks, and PEFT's pruned file loads here."""
    config = dict(target_modules=["q_proj", "v_proj"], **SCHEDULE)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**config))
    theirs.save_pretrained(tmp_path / "start")
    ours = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "start", is_trainable=True)

    train(theirs, SCHEDULE["total_step"])
    train(ours, SCHEDULE["total_step"])
    their_pattern = {
        key.replace(".default", ""): mask for key, mask in theirs.peft_config["default"].rank_pattern.items()
    }
    assert ours.peft_config["default"].rank_pattern == their_pattern
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)

    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "pruned")
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "pruned")
    for path, layer in loaded.adapter_layers():
        assert layer.r["default"] == sum(their_pattern[f"{path}.lora_E"])
        assert layer.ranknum["default"] == SCHEDULE["init_r"]
    torch.testing.assert_close(logits(loaded), expected, **TOL)
