"""Greedy generation with a prompt tuning adapter gives PEFT's tokens exactly, with the KV cache and without."""

from __future__ import annotations

import copy
import warnings

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import tiny_gpt2, tiny_llama, tiny_t5
from peftkit_prompt_tuning import PromptTuningConfig


def pair(build, task, tmp_path, num_virtual_tokens=3):
    """Our adapter with trained values, and PEFT's model loaded from our files, on identical base weights."""
    base = build()
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(
        base, PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)
    )
    with torch.no_grad():
        weight = ours.prompt_modules["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    ours.save_pretrained(tmp_path)
    return ours, peft.PeftModel.from_pretrained(pristine, tmp_path)


def batch(padded=True):
    ids = torch.randint(3, 120, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:  # left padding, as decoder-only generation wants; pad id 0
        ids[0, :2] = 0
        mask[0, :2] = 0
        ids[2, :1] = 0
        mask[2, :1] = 0
    return ids, mask


def generate(model, **kwargs):
    settings = dict(max_new_tokens=7, do_sample=False) | kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns at every step that it drops generate's position_ids
        return model.generate(**settings)


CAUSAL = {
    "llama": tiny_llama,
    "gpt2": lambda: tiny_gpt2(initializer_range=0.3),
}


@pytest.mark.parametrize("name", sorted(CAUSAL))
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_causal_lm_greedy_tokens_equal_peft_s_with_the_kv_cache(name, padded, tmp_path):
    ours, theirs = pair(CAUSAL[name], "CAUSAL_LM", tmp_path)
    ids, mask = batch(padded)
    mine = generate(ours, input_ids=ids, attention_mask=mask)
    assert mine.shape == (3, 6 + 7)
    assert torch.equal(mine[:, :6], ids)
    assert torch.equal(mine, generate(theirs, input_ids=ids, attention_mask=mask))
    # the virtual tokens matter: without them the tokens differ
    with ours.disable_adapter():
        assert not torch.equal(mine, generate(ours, input_ids=ids, attention_mask=mask))


def test_causal_lm_greedy_tokens_equal_peft_s_without_a_mask_and_without_the_cache(tmp_path):
    ours, theirs = pair(tiny_llama, "CAUSAL_LM", tmp_path)
    ids, mask = batch(padded=True)
    # no mask: transformers infers it from the pad tokens, then the adapter extends it
    assert torch.equal(generate(ours, input_ids=ids), generate(theirs, input_ids=ids))
    # no cache: every step sees the virtual tokens and the whole sequence again
    no_cache = generate(ours, input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.equal(no_cache, generate(theirs, input_ids=ids, attention_mask=mask, use_cache=False))
    assert torch.equal(no_cache, generate(ours, input_ids=ids, attention_mask=mask))
    # positional input_ids, as PEFT users call it
    assert torch.equal(generate(ours, inputs=None, input_ids=ids[1:2]), generate(theirs, input_ids=ids[1:2]))


def test_generate_leaves_the_base_model_s_own_step_preparation_in_place(tmp_path):
    ours, _ = pair(tiny_llama, "CAUSAL_LM", tmp_path)
    base = ours.get_base_model()
    ids, mask = batch()
    generate(ours, input_ids=ids, attention_mask=mask)
    assert "prepare_inputs_for_generation" not in vars(base)
    plain = generate(base, input_ids=ids, attention_mask=mask)
    with ours.disable_adapter():
        assert torch.equal(generate(ours, input_ids=ids, attention_mask=mask), plain)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_seq2seq_greedy_tokens_equal_peft_s(padded, tmp_path):
    ours, theirs = pair(lambda: tiny_t5(initializer_factor=3.0), "SEQ_2_SEQ_LM", tmp_path)
    ids, mask = batch(padded)
    mine = generate(ours, input_ids=ids, attention_mask=mask)
    assert mine.shape == (3, 1 + 7)
    assert torch.equal(mine, generate(theirs, input_ids=ids, attention_mask=mask))
    with ours.disable_adapter():
        assert not torch.equal(mine, generate(ours, input_ids=ids, attention_mask=mask))


def test_seq2seq_generate_ignores_encoder_outputs_with_a_warning(tmp_path):
    ours, _ = pair(tiny_t5, "SEQ_2_SEQ_LM", tmp_path)
    ids, mask = batch()
    expected = generate(ours, input_ids=ids, attention_mask=mask)
    stale = ours.get_base_model().get_encoder()(input_ids=ids, attention_mask=mask)
    with pytest.warns(
        UserWarning, match=r"prompt tuning ignores encoder_outputs passed to generate\(\) \(as PEFT"
    ):
        again = ours.generate(
            input_ids=ids, attention_mask=mask, encoder_outputs=stale, max_new_tokens=7, do_sample=False
        )
    assert torch.equal(again, expected)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_generate_needs_input_ids(task, tmp_path):
    ours, _ = pair(tiny_llama if task == "CAUSAL_LM" else tiny_t5, task, tmp_path)
    ids, mask = batch()
    embeds = ours.get_base_model().get_input_embeddings()(ids)
    message = r"generate\(\) with a prompt tuning adapter takes input_ids \(and no inputs_embeds\)"
    with pytest.raises(ValueError, match=message):
        ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        ours.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=2)


def test_generate_ignores_position_ids_with_a_warning(tmp_path):
    ours, theirs = pair(tiny_llama, "CAUSAL_LM", tmp_path)
    ids, mask = batch()
    expected = generate(theirs, input_ids=ids, attention_mask=mask)
    with pytest.warns(UserWarning, match=r"prompt tuning ignores position_ids \(as PEFT does\)"):
        mine = ours.generate(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(6).expand(3, 6),
            max_new_tokens=7,
            do_sample=False,
        )
    assert torch.equal(mine, expected)


def test_a_static_cache_s_4d_mask_is_refused_clearly(tmp_path):
    ours, _ = pair(tiny_llama, "CAUSAL_LM", tmp_path)
    ids, mask = batch()
    with pytest.raises(
        ValueError, match=r"prompt tuning can extend a 2D attention mask, got a 4D one: generate with"
    ):
        generate(ours, input_ids=ids, attention_mask=mask, cache_implementation="static")
    assert "prepare_inputs_for_generation" not in vars(ours.get_base_model())
