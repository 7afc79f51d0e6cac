"""Prompt tuning adapters move between peftkit and PEFT with the same outputs, both ways, for every task."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_prompt_tuning import PromptTuningConfig
from safetensors.torch import load_file

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_bert_qa():
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    settings = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return BertForQuestionAnswering(BertConfig(**settings)).eval()


def tiny_bert_bare():
    return tiny_bert().bert  # a BertModel: PEFT finds its word embeddings at embeddings.word_embeddings


# name: (model builder, task, the output compared, whether the model takes token_type_ids)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM", "logits", False),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", "logits", False),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS", "logits", True),
    "llama-seq-cls": (lambda: tiny_llama(num_labels=3), "SEQ_CLS", "logits", False),
    "bert-token-cls": (lambda: tiny_bert(task="token_cls"), "TOKEN_CLS", "logits", True),
    "bert-qa": (tiny_bert_qa, "QUESTION_ANS", "start_logits", True),
    "bert-features": (tiny_bert_bare, "FEATURE_EXTRACTION", "last_hidden_state", False),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", "logits", False),
}


def inputs(task, token_types=False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = dict(input_ids=ids, attention_mask=mask)
    if task == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = torch.randint(2, 128, (2, 4), generator=generator)
    if token_types:  # PEFT keeps them for classification and QA, with zeros for the virtual tokens
        out["token_type_ids"] = (torch.arange(9) >= 5).long().expand(2, 9)
    return out


def output(model, case):
    _, task, name, token_types = CASES[case]
    # PEFT's QA forward takes token_type_ids and passes them on to nothing; peftkit says so
    dropped = token_types and task == "QUESTION_ANS" and isinstance(model, peftkit.PeftModel)
    said = (
        pytest.warns(UserWarning, match="prompt tuning ignores token_type_ids") if dropped else nullcontext()
    )
    with torch.no_grad(), said:
        return getattr(model(**inputs(task, token_types)), name)


def config_kwargs(task):
    return dict(task_type=task, num_virtual_tokens=3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, task, _, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, PromptTuningConfig(**config_kwargs(task))), scale=0.5
    )
    expected = output(ours, case)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(output(theirs, case), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, task, _, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    plain = output(pristine, case)
    theirs = randomize_trainable(
        peft.get_peft_model(base, peft.PromptTuningConfig(**config_kwargs(task))), scale=0.5
    )
    expected = output(theirs, case)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(output(ours, case), expected, **TOL)
    # the adapter changes the outputs: the comparison is not base model against base model
    assert plain.shape != expected.shape or not torch.allclose(plain, expected)


@pytest.mark.parametrize(
    ("build", "task", "heads"),
    [
        (tiny_llama, "CAUSAL_LM", []),
        (tiny_bert, "SEQ_CLS", ["base_model.classifier.bias", "base_model.classifier.weight"]),
        (lambda: tiny_llama(num_labels=3), "SEQ_CLS", ["base_model.score.weight"]),
        (tiny_t5, "SEQ_2_SEQ_LM", []),
    ],
)
def test_files_hold_peft_s_keys_shapes_and_config(build, task, heads, tmp_path):
    base = build()
    pristine = copy.deepcopy(base)
    peftkit.get_peft_model(base, PromptTuningConfig(**config_kwargs(task))).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(pristine, peft.PromptTuningConfig(**config_kwargs(task))).save_pretrained(
        tmp_path / "theirs"
    )

    ours, theirs = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "theirs"))
    assert sorted(ours) == sorted(theirs) == sorted(["prompt_embeddings", *heads])
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    rows = 3 * (2 if task == "SEQ_2_SEQ_LM" else 1)
    assert ours["prompt_embeddings"].shape == (rows, 32)

    our_config, their_config = (
        json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")
    )
    for key in (
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "prompt_tuning_init",
        "inference_mode",
    ):
        assert our_config[key] == their_config[key], key


def test_causal_lm_labels_get_minus_100_for_the_virtual_tokens_as_in_peft(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        scale=0.5,
    )
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    batch = inputs("CAUSAL_LM")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        our_loss = ours(**batch, labels=labels).loss
        their_loss = theirs(**batch, labels=labels).loss
    torch.testing.assert_close(our_loss, their_loss, **TOL)


def test_seq2seq_labels_and_decoder_are_left_as_peft_leaves_them(tmp_path):
    base = tiny_t5()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)),
        scale=0.5,
    )
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    batch = inputs("SEQ_2_SEQ_LM")
    labels = batch.pop("decoder_input_ids")
    with torch.no_grad():
        our_out = ours(**batch, labels=labels)
        their_out = theirs(**batch, labels=labels)
    assert our_out.logits.shape == (2, 4, 128)
    torch.testing.assert_close(our_out.loss, their_out.loss, **TOL)


def test_position_ids_are_ignored_with_a_warning_as_in_peft(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        scale=0.5,
    )
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    batch = inputs("CAUSAL_LM") | dict(position_ids=torch.arange(9).expand(2, 9) + 5)
    with pytest.warns(UserWarning, match=r"prompt tuning ignores position_ids \(as PEFT does\)"):
        ours_logits = ours(**batch).logits
    with pytest.warns(UserWarning):
        their_logits = theirs(**batch).logits
    torch.testing.assert_close(ours_logits, their_logits, **TOL)


def test_token_type_ids_are_dropped_with_a_warning_where_peft_drops_them():
    model = peftkit.get_peft_model(
        tiny_bert_bare(), PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)
    )
    batch = inputs("FEATURE_EXTRACTION")
    plain = model(**batch).last_hidden_state
    with pytest.warns(UserWarning, match=r"prompt tuning ignores token_type_ids \(as PEFT does\)"):
        dropped = model(**batch, token_type_ids=torch.ones_like(batch["input_ids"])).last_hidden_state
    torch.testing.assert_close(dropped, plain)
