"""Greedy generation with a prefix tuning adapter gives PEFT's tokens exactly, with the KV cache and without."""

from __future__ import annotations

import copy
import warnings

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_prefix_tuning import PrefixTuningConfig


def pair(build, task, tmp_path, **settings):
    """Our adapter with trained values, and PEFT's model loaded from our files, on identical base weights."""
    base = build()
    pristine = copy.deepcopy(base)
    config = PrefixTuningConfig(task_type=task, num_virtual_tokens=3, **settings)
    ours = randomize_trainable(peftkit.get_peft_model(base, config), seed=3, scale=1.0)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
        warnings.simplefilter("ignore")
        return model.generate(**settings)


CAUSAL = {
    "llama": lambda: tiny_llama(initializer_range=0.3),
    "gpt2": lambda: tiny_gpt2(initializer_range=0.3),
}


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projected"])
@pytest.mark.parametrize("name", sorted(CAUSAL))
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_causal_lm_greedy_tokens_equal_peft_s_with_the_kv_cache(name, padded, projection, tmp_path):
    ours, theirs = pair(CAUSAL[name], "CAUSAL_LM", tmp_path, prefix_projection=projection)
    ids, mask = batch(padded)
    mine = generate(ours, input_ids=ids, attention_mask=mask)
    assert mine.shape == (3, 6 + 7)
    assert torch.equal(mine[:, :6], ids)
    assert torch.equal(mine, generate(theirs, input_ids=ids, attention_mask=mask))
    # the prefix matters: without it the tokens differ
    with ours.disable_adapter():
        assert not torch.equal(mine, generate(ours, input_ids=ids, attention_mask=mask))


def test_greedy_tokens_follow_the_forward_pass_step_by_step(tmp_path):
    """Each generated token is the argmax of a full forward over the sequence so far: the cached steps see
    the prefix exactly as an uncached forward does. generate() numbers positions from the mask (padding
    left out), so the forward gets the same positions; both shift them past the prefix."""
    ours, _ = pair(CAUSAL["llama"], "CAUSAL_LM", tmp_path)
    ids, mask = batch(padded=True)
    tokens = generate(ours, input_ids=ids, attention_mask=mask)
    for step in range(7):
        sequence = tokens[:, : 6 + step]
        full_mask = torch.cat((mask, torch.ones(3, step, dtype=mask.dtype)), dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = ours(input_ids=sequence, attention_mask=full_mask, position_ids=positions).logits[:, -1]
        assert torch.equal(logits.argmax(-1), tokens[:, 6 + step])


def test_causal_lm_greedy_tokens_equal_peft_s_without_a_mask_and_ours_without_the_cache(tmp_path):
    ours, theirs = pair(CAUSAL["llama"], "CAUSAL_LM", tmp_path)
    ids, mask = batch(padded=True)
    assert torch.equal(generate(ours, input_ids=ids), generate(theirs, input_ids=ids))
    # without the cache every step runs over the prefix and the whole sequence again: the same tokens
    # (PEFT 0.21 fails here: it feeds the previous step's cache back with the whole sequence)
    no_cache = generate(ours, input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.equal(no_cache, generate(ours, input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projected"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_seq2seq_greedy_tokens_equal_peft_s(padded, projection, tmp_path):
    ours, theirs = pair(
        lambda: tiny_t5(initializer_factor=3.0), "SEQ_2_SEQ_LM", tmp_path, prefix_projection=projection
    )
    ids, mask = batch(padded)
    mine = generate(ours, input_ids=ids, attention_mask=mask)
    assert mine.shape == (3, 1 + 7)
    assert torch.equal(mine, generate(theirs, input_ids=ids, attention_mask=mask))
    with ours.disable_adapter():
        assert not torch.equal(mine, generate(ours, input_ids=ids, attention_mask=mask))
    no_cache = generate(ours, input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.equal(no_cache, mine)


def test_generate_leaves_the_base_model_s_own_step_preparation_in_place(tmp_path):
    ours, _ = pair(tiny_llama, "CAUSAL_LM", tmp_path)
    ids, mask = batch()
    generate(ours, input_ids=ids, attention_mask=mask)
    assert "prepare_inputs_for_generation" not in vars(ours.get_base_model())


def test_a_static_cache_s_4d_mask_is_refused_clearly(tmp_path):
    ours, _ = pair(tiny_llama, "CAUSAL_LM", tmp_path)
    ids, mask = batch()
    with pytest.raises(
        ValueError, match=r"prefix tuning can extend a 2D attention mask, got a 4D one: generate with"
    ):
        generate(ours, input_ids=ids, attention_mask=mask, cache_implementation="static")
