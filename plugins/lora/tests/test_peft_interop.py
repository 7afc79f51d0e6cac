"""LoRA adapters move between peftkit and PEFT with the same outputs, both ways."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama
from peftkit_lora import LoraConfig

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama": (tiny_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "llama-rslora-patterns": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
            task_type="CAUSAL_LM",
        ),
    ),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")),
    "bert-seq-cls": (
        tiny_bert,
        dict(target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only"),
    ),
    # bias="all" with a task head: PEFT also saves the head wrapper's inner biases
    # (classifier.modules_to_save.bias, classifier.original_module.bias)
    "bert-seq-cls-bias-all": (
        tiny_bert,
        dict(target_modules=["query"], task_type="SEQ_CLS", bias="all"),
    ),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")),
}


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return dict(input_ids=ids, attention_mask=mask)


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(peftkit.get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kwargs)))
    expected = logits(ours)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = randomize_trainable(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **kwargs)))
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)


def test_saved_files_use_peft_key_names_and_config_fields(tmp_path):
    from safetensors import safe_open

    model = peftkit.get_peft_model(
        tiny_bert(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")
    )
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert not any(".default" in key or "base_layer" in key for key in keys)
    assert metadata["format"] == "pt" and metadata["peftkit.method"] == "lora"
    assert metadata["peftkit.plugin"] == "peftkit-lora"

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_fields = set(peft.LoraConfig(r=4).to_dict())
    assert set(config) <= peft_fields
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier", "score"]
    assert config["inference_mode"] is True


def test_named_adapters_save_in_subfolders_as_peft_does(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    model = peftkit.get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    model.set_adapter("second")
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    theirs.set_adapter("second")
    torch.testing.assert_close(logits(theirs), expected, **TOL)
