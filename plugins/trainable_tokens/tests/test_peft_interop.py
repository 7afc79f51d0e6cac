"""Trainable tokens adapters move between peftkit and PEFT with the same outputs and keys, both ways."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import tiny_gpt2, tiny_llama
from peftkit_trainable_tokens import TrainableTokensConfig
from safetensors.torch import load_file

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-6)
ROWS = [2, 7, 40, 127]

CASES = {
    # an untied embed_tokens: only the embedding changes
    "llama": (tiny_llama, dict(), ["model.embed_tokens"]),
    # GPT-2's wte is tied to lm_head: the head's logits of those tokens use the trained rows too
    "gpt2-tied": (tiny_gpt2, dict(), ["transformer.wte", "lm_head"]),
    "llama-tied": (lambda: tiny_llama(tie_word_embeddings=True), dict(), ["model.embed_tokens", "lm_head"]),
    "llama-named-target": (tiny_llama, dict(target_modules=["embed_tokens"]), ["model.embed_tokens"]),
}


def inputs():
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, 3] = 7, 40  # trained rows in every sequence
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


def trained(model, seed=2):
    """The trainable rows moved, as training moves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def assert_relative_close(actual, expected, rtol=1e-5):
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= rtol, f"relative error {error:.2e} > {rtol}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = trained(peftkit.get_peft_model(base, TrainableTokensConfig(token_indices=ROWS, **kwargs)))
    expected = logits(ours)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    assert_relative_close(logits(theirs), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = trained(peft.get_peft_model(base, peft.TrainableTokensConfig(token_indices=ROWS, **kwargs)))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    assert_relative_close(logits(ours), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_keys_shapes_and_config_are_peft_s(case, tmp_path):
    build, kwargs, modules = CASES[case]
    ours = peftkit.get_peft_model(build(), TrainableTokensConfig(token_indices=ROWS, **kwargs))
    theirs = peft.get_peft_model(build(), peft.TrainableTokensConfig(token_indices=ROWS, **kwargs))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_saved = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_saved.items()} == {k: v.shape for k, v in theirs_saved.items()}
    assert set(ours_saved) == {f"base_model.model.{m}.trainable_tokens_delta" for m in modules}
    for key, tensor in theirs_saved.items():  # init_weights=True: both hold the rows as they were
        assert torch.equal(ours_saved[key], tensor)

    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    # modules_to_save is every peftkit config's field (PEFT's TrainableTokensConfig lacks it; its loader
    # ignores the key with a warning)
    assert set(ours_config) - {"modules_to_save"} <= set(theirs_config)
    assert ours_config["modules_to_save"] is None
    for field in ("peft_type", "token_indices", "target_modules", "init_weights"):
        assert ours_config[field] == theirs_config[field], field


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unload_matches_peft(case):
    build, kwargs, _ = CASES[case]
    theirs = trained(peft.get_peft_model(build(), peft.TrainableTokensConfig(token_indices=ROWS, **kwargs)))
    ours = peftkit.get_peft_model(build(), TrainableTokensConfig(token_indices=ROWS, **kwargs))
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.copy_(theirs.base_model.model.get_input_embeddings().trainable_tokens_delta["default"])
    merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    assert_relative_close(logits(merged_ours), logits(merged_theirs))
    assert merged_ours.state_dict().keys() == merged_theirs.state_dict().keys()
    for key, tensor in merged_theirs.state_dict().items():
        assert torch.equal(merged_ours.state_dict()[key], tensor), key
