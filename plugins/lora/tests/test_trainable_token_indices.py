"""LoraConfig(trainable_token_indices=...): the named embedding rows train beside LoRA, in PEFT's layout.

Compared with PEFT 0.21 both ways (outputs, keys, merged weights); only the named rows change in
training; the file holds only those rows; merging writes them in; clear errors for what cannot work.
"""

from __future__ import annotations

import copy
import sys
import warnings

import peft
import peftkit
import pytest
import torch
from peftkit import ConfigError, TargetModulesError
from peftkit.testing.models import tiny_gpt2, tiny_llama
from peftkit_lora import LoraConfig
from safetensors.torch import load_file

pytest.importorskip(
    "peftkit_trainable_tokens", reason="trainable_token_indices needs peftkit-trainable-tokens"
)
pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

ROWS = [2, 7, 40]
HEAD_ROWS = [5, 9]
CASES = {
    # (base model, trainable_token_indices, the embeddings whose rows the file holds)
    "list": (tiny_llama, ROWS, ["model.embed_tokens"]),
    "dict": (tiny_llama, {"embed_tokens": ROWS, "lm_head": HEAD_ROWS}, ["model.embed_tokens", "lm_head"]),
    # tied: the head shares the embedding's rows, saved once under the embedding (PEFT's LoRA layout)
    "tied-list": (lambda: tiny_llama(tie_word_embeddings=True), ROWS, ["model.embed_tokens"]),
    "tied-dict": (
        lambda: tiny_llama(tie_word_embeddings=True),
        {"embed_tokens": ROWS, "lm_head": ROWS},
        ["model.embed_tokens"],
    ),
    "gpt2-tied": (tiny_gpt2, ROWS, ["transformer.wte"]),
}


def target(build):
    return ["c_attn"] if build is tiny_gpt2 else ["q_proj"]


def config(case, library=peftkit, **changes):
    build, indices, _ = CASES[case]
    settings = dict(r=2, target_modules=target(build), trainable_token_indices=copy.deepcopy(indices))
    cls = LoraConfig if library is peftkit else peft.LoraConfig
    return cls(**settings | changes)


def inputs():
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, 3], ids[:, 5] = 7, 40, 9  # trained rows in every sequence
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


def trained(model, seed=2):
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
    build = CASES[case][0]
    pristine = build()
    ours = trained(peftkit.get_peft_model(build(), config(case)))
    expected = logits(ours)
    assert not torch.allclose(expected, logits(pristine))
    ours.save_pretrained(tmp_path)
    assert_relative_close(logits(peft.PeftModel.from_pretrained(pristine, tmp_path)), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build = CASES[case][0]
    pristine = build()
    theirs = trained(peft.get_peft_model(build(), config(case, library=peft)))
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)
    assert_relative_close(logits(peftkit.PeftModel.from_pretrained(pristine, tmp_path)), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_file_holds_lora_and_the_named_rows_only_as_peft_keys_them(case, tmp_path):
    build, _, embeddings = CASES[case]
    peftkit.get_peft_model(build(), config(case)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(build(), config(case, library=peft)).save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    rows = {k for k in ours if "trainable_tokens_delta" in k}
    assert rows == {f"base_model.model.{m}.token_adapter.trainable_tokens_delta" for m in embeddings}
    for key in rows:  # the rows as they were, before training
        assert torch.equal(ours[key], theirs[key])


@pytest.mark.parametrize("case", ["list", "dict", "tied-list"])
def test_a_training_step_changes_only_the_named_rows_and_lora(case):
    build, indices, _ = CASES[case]
    model = peftkit.get_peft_model(build(), config(case, init_lora_weights="gaussian"))
    base = model.base_model.model
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**inputs(), labels=inputs()["input_ids"]).loss.backward()
    optimizer.step()
    changed = {name for name, p in base.named_parameters() if not torch.equal(p, before[name])}
    assert any("lora_" in name for name in changed)
    assert all("lora_" in name or "trainable_tokens_delta" in name for name in changed), changed
    # the base embedding is untouched until merged; the trained rows are the adapter's
    embedding = base.get_input_embeddings()
    assert torch.equal(embedding.get_base_layer().weight, before["model.embed_tokens.base_layer.weight"])
    rows = indices if isinstance(indices, list) else indices["embed_tokens"]
    delta = embedding.trainable_tokens_delta["default"]
    assert delta.shape[0] == len(rows)
    assert not torch.equal(delta, embedding.trainable_tokens_original["default"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_writes_the_rows_in_as_peft_does(case, tmp_path):
    build = CASES[case][0]
    theirs = trained(peft.get_peft_model(build(), config(case, library=peft)))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(build(), tmp_path)
    expected = logits(theirs)
    assert_relative_close(logits(ours), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tied head reads the same rows: no tied-weights warning
        merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert_relative_close(logits(merged_ours), expected, rtol=1e-5)
    for key, tensor in merged_theirs.state_dict().items():
        torch.testing.assert_close(merged_ours.state_dict()[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_unmerge_gives_back_the_embedding_bit_for_bit():
    model = trained(peftkit.get_peft_model(tiny_llama(tie_word_embeddings=True), config("tied-list")))
    weight = model.base_model.model.get_input_embeddings().get_base_layer().weight
    before = weight.detach().clone()
    model.merge_adapter()
    assert not torch.equal(weight, before)
    model.unmerge_adapter()
    assert torch.equal(weight, before)


def test_a_second_adapter_with_other_rows_joins_the_same_embedding():
    model = peftkit.get_peft_model(tiny_llama(), config("list"))
    model.add_adapter("other", config("list", trainable_token_indices=[11, 12]))
    embedding = model.base_model.model.get_input_embeddings()
    assert embedding.token_indices == {"default": ROWS, "other": [11, 12]}
    model.delete_adapter("other")
    assert embedding.token_indices == {"default": ROWS}


# --- clear errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("embed_tokens", "LoraConfig.trainable_token_indices must be a list of token ids, or a dict of"),
        ([], "(non-empty lists of ids >= 0), got []"),
        ([1, -2], "(non-empty lists of ids >= 0), got [1, -2]"),
        ([1, True], "(non-empty lists of ids >= 0)"),
        ({"embed_tokens": []}, "(non-empty lists of ids >= 0)"),
        ({"": [1]}, "(names: non-empty strings)"),
        ([3, 1, 3], "lists that name each token once ([3] repeat), got [3, 1, 3]"),
    ],
)
def test_bad_trainable_token_indices_name_the_field_and_the_fix(value, expected):
    with pytest.raises(ConfigError) as raised:
        LoraConfig(trainable_token_indices=value)
    assert expected in str(raised.value)


def test_the_embedding_cannot_be_both_a_module_to_save_and_have_trainable_rows():
    with pytest.raises(
        ConfigError, match="no embedding that modules_to_save also names \\('embed_tokens'\\)"
    ):
        LoraConfig(trainable_token_indices={"embed_tokens": [1]}, modules_to_save=["embed_tokens"])


def test_a_name_that_matches_no_module_lists_the_embeddings():
    with pytest.raises(TargetModulesError) as raised:
        peftkit.get_peft_model(tiny_llama(), config("list", trainable_token_indices={"wte": [1]}))
    assert (
        "names 'wte', which matches no module of LlamaForCausalLM; its embeddings are ['model.embed_tokens']"
        in str(raised.value)
    )


def test_rows_of_a_module_that_lora_also_targets_are_refused():
    with pytest.raises(
        TargetModulesError, match="'model.embed_tokens', which already has a LoraLayer adapter"
    ):
        peftkit.get_peft_model(tiny_llama(), config("list", target_modules=["q_proj", "embed_tokens"]))


def test_a_tied_head_may_not_get_other_rows_than_the_embedding():
    bad = {"embed_tokens": [1, 2], "lm_head": [3]}
    with pytest.raises(TargetModulesError, match="but the two are tied \\(one weight\\): name the same rows"):
        peftkit.get_peft_model(
            tiny_llama(tie_word_embeddings=True), config("list", trainable_token_indices=bad)
        )


def test_a_tied_head_with_lora_is_refused():
    with pytest.raises(TargetModulesError, match="whose tied output head 'lm_head' has a LoRA adapter too"):
        peftkit.get_peft_model(
            tiny_llama(tie_word_embeddings=True), config("list", target_modules=["lm_head"])
        )


def test_without_the_trainable_tokens_plugin_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peftkit_trainable_tokens", None)  # import fails as if not installed
    with pytest.raises(TargetModulesError, match=r"pip install 'peftkit-lora\[trainable-tokens\]'"):
        peftkit.get_peft_model(tiny_llama(), config("list"))
