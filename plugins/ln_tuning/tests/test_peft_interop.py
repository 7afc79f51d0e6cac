"""LN tuning adapters move between peftkit and PEFT with the same outputs, both ways."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_ln_tuning import LNTuningConfig
from safetensors import safe_open

pytestmark = [
    pytest.mark.numerics,  # also run under torch's generic CPU kernels (dev.sh)
    pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning"),  # PEFT on norm layers
]

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama-defaults": (tiny_llama, dict(task_type="CAUSAL_LM")),  # LlamaRMSNorm, PEFT's default norms
    "llama-named": (tiny_llama, dict(target_modules=["input_layernorm"], task_type="CAUSAL_LM")),
    "gpt2-defaults": (tiny_gpt2, dict(task_type="CAUSAL_LM")),  # nn.LayerNorm: weight and bias
    # BERT has no PEFT default; a classification head trains and is saved with the adapter
    "bert-seq-cls": (tiny_bert, dict(target_modules=["LayerNorm"], task_type="SEQ_CLS")),
    "bert-regex": (tiny_bert, dict(target_modules=r".*encoder.*output\.LayerNorm", task_type="SEQ_CLS")),
    "t5-defaults": (tiny_t5, dict(task_type="SEQ_2_SEQ_LM")),  # T5LayerNorm, encoder and decoder
}


def inputs(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    if getattr(model.config, "is_encoder_decoder", False):
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
    return dict(input_ids=ids, attention_mask=mask)


def logits(model):
    with torch.no_grad():
        return model(**inputs(model)).logits


def trained(model, seed=2):
    """Every trainable tensor (the norms' copies, a head) moved, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = trained(peftkit.get_peft_model(base, LNTuningConfig(**kwargs)))
    expected = logits(ours)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = trained(peft.get_peft_model(base, peft.LNTuningConfig(**kwargs)))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    assert isinstance(ours.peft_config["default"], LNTuningConfig)
    torch.testing.assert_close(logits(ours), expected, **TOL)


def saved_keys(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return {key: tuple(f.get_tensor(key).shape) for key in f.keys()}


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_saved_keys_shapes_and_config_are_peft_s(build, tmp_path):
    kwargs = dict(target_modules=["input_layernorm", "norm"] if build is tiny_llama else ["LayerNorm"])
    peft.get_peft_model(build(), peft.LNTuningConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    peftkit.get_peft_model(build(), LNTuningConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    ours = saved_keys(tmp_path / "ours")
    assert ours == saved_keys(tmp_path / "peft")
    if build is tiny_llama:
        assert ours["base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight"] == (32,)
    else:
        assert "base_model.model.bert.embeddings.LayerNorm.ln_tuning_layers.bias" in ours
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING"
    assert sorted(config["target_modules"]) == sorted(kwargs["target_modules"])


def test_peft_merges_our_adapter_as_we_do(tmp_path):
    """PEFT's merge_and_unload of our adapter and ours give the same plain model."""
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    ours = trained(peftkit.get_peft_model(base, LNTuningConfig()))
    ours.save_pretrained(tmp_path)
    their_merged = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).merge_and_unload()
    our_merged = peftkit.PeftModel.from_pretrained(pristine, tmp_path).merge_and_unload()
    their_state, our_state = their_merged.state_dict(), our_merged.state_dict()
    assert set(their_state) == set(our_state)
    for key, tensor in our_state.items():
        assert torch.equal(tensor, their_state[key]), key
