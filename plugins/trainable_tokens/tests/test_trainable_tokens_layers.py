"""Trainable tokens' layers: only the named rows train, merging writes them, mixed batches, tied heads."""

from __future__ import annotations

import copy
import warnings

import peftkit
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit.testing.models import tiny_gpt2, tiny_llama
from peftkit_trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

ROWS = [2, 7, 40]


def batch(seed=0):
    ids = torch.randint(1, 128, (3, 8), generator=torch.Generator().manual_seed(seed))
    ids[:, 1], ids[:, 4], ids[:, 6] = 7, 2, 40  # the rows of ROWS
    return ids


def train_steps(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for step in range(steps):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, lambda: tiny_llama(tie_word_embeddings=True)])
def test_training_changes_only_the_named_rows(build):
    base = build()
    before = {name: t.detach().clone() for name, t in base.state_dict().items()}
    model = peftkit.get_peft_model(base, TrainableTokensConfig(token_indices=ROWS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].shape == (len(ROWS), base.config.hidden_size)
    start = trainable[0].detach().clone()
    train_steps(model)
    assert not torch.equal(trainable[0], start), "the rows did not train"
    # every base tensor (all rows of the embedding, an untied lm_head) is bitwise unchanged
    for name, tensor in base.state_dict().items():
        if "trainable_tokens" not in name:
            assert torch.equal(tensor, before[name.replace(".base_layer", "")]), name
    # merged, the embedding differs from the original in the named rows only, all of which trained
    embedding_key = next(k for k in before if k.endswith(("embed_tokens.weight", "wte.weight")))
    merged = model.merge_and_unload()
    changed = (merged.get_input_embeddings().weight != before[embedding_key]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == ROWS
    if not base.config.tie_word_embeddings:
        assert torch.equal(merged.lm_head.weight, before["lm_head.weight"])


def test_the_tied_head_uses_the_trained_rows():
    base = tiny_gpt2()
    pristine = copy.deepcopy(base)
    model = peftkit.get_peft_model(base, TrainableTokensConfig(token_indices=ROWS, init_weights=False))
    head = model.base_model.model.lm_head
    assert isinstance(head, TrainableTokensLayer) and head.tied_to is model.base_model.model.transformer.wte
    assert head.trainable_tokens_delta is head.tied_to.trainable_tokens_delta  # one set of rows, not two
    ids = torch.tensor([[5, 6, 8, 9]])  # none of the trained tokens: only the head can change the logits
    with torch.no_grad():
        out = model(input_ids=ids).logits
        ref = pristine(input_ids=ids).logits
    others = [i for i in range(128) if i not in ROWS]
    assert torch.equal(out[..., others], ref[..., others])
    assert not torch.allclose(out[..., ROWS], ref[..., ROWS])


def test_merging_with_a_tied_head_gives_the_unmerged_outputs_without_a_tied_weights_warning():
    model = peftkit.get_peft_model(tiny_gpt2(), TrainableTokensConfig(token_indices=ROWS, init_weights=False))
    ids = batch()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the core warns where a tie makes merged outputs differ: not here
        model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged)


def test_untied_head_is_not_wrapped():
    model = peftkit.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=ROWS))
    assert type(model.base_model.model.lm_head) is torch.nn.Linear


@settings(max_examples=10, deadline=None)
@given(
    rows=st.sets(st.integers(0, 127), min_size=1, max_size=20),
    tied=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_merge_matches_the_forward_and_unmerge_restores_the_embedding_bitwise(rows, tied, dtype):
    base = (tiny_gpt2() if tied else tiny_llama()).to(dtype)
    original = base.get_input_embeddings().weight.detach().clone()
    model = peftkit.get_peft_model(
        base, TrainableTokensConfig(token_indices=sorted(rows), init_weights=False)
    )
    ids = batch()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=0)  # the same rows looked up, no arithmetic
    assert torch.equal(after, unmerged)
    assert torch.equal(model.base_model.model.get_input_embeddings().weight, original)


def test_mixed_batch_rows_use_their_own_adapter():
    ids = batch()
    model = peftkit.get_peft_model(tiny_gpt2(), TrainableTokensConfig(token_indices=ROWS, init_weights=False))
    model.add_adapter("other", TrainableTokensConfig(token_indices=[7, 9], init_weights=False))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "other", "__base__"]).logits
        model.set_adapter("default")
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        second = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], first[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], second[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2], plain[2], rtol=0, atol=1e-6)
    assert not torch.allclose(first[0], second[0])


def test_overlapping_adapters_cannot_act_together():
    model = peftkit.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=ROWS))
    model.add_adapter("other", TrainableTokensConfig(token_indices=[7, 9]))
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"'default' and 'other' both hold token 7"):
        model(input_ids=batch())


def test_disjoint_adapters_act_together():
    model = peftkit.get_peft_model(
        tiny_llama(), TrainableTokensConfig(token_indices=[2, 7], init_weights=False)
    )
    model.add_adapter("other", TrainableTokensConfig(token_indices=[40], init_weights=False))
    model.set_adapter(["default", "other"])
    embed = model.base_model.model.get_input_embeddings()
    with torch.no_grad():
        rows = embed(torch.tensor([[2, 7, 40, 5]]))[0]
    assert torch.equal(rows[0], embed.trainable_tokens_delta["default"][0])
    assert torch.equal(rows[1], embed.trainable_tokens_delta["default"][1])
    assert torch.equal(rows[2], embed.trainable_tokens_delta["other"][0])
    assert torch.equal(rows[3], embed.get_base_layer().weight[5])


def test_token_index_past_the_embedding_is_refused():
    with pytest.raises(ValueError, match=r"token_indices has \[128, 500\], past the 128 rows of"):
        peftkit.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[3, 128, 500]))


def test_non_embedding_target_is_refused():
    with pytest.raises(peftkit.TargetModulesError, match="trainable tokens adapts a token embedding"):
        peftkit.get_peft_model(
            tiny_llama(), TrainableTokensConfig(token_indices=[3], target_modules=["norm"])
        )


def test_delete_adapter_removes_its_rows():
    model = peftkit.get_peft_model(tiny_gpt2(), TrainableTokensConfig(token_indices=ROWS))
    model.add_adapter("other", TrainableTokensConfig(token_indices=[9]))
    model.delete_adapter("other")
    embed = model.base_model.model.get_input_embeddings()
    assert list(embed.trainable_tokens_delta) == ["default"] and list(embed.token_indices) == ["default"]
