"""Prefix tuning adapters move between peftkit and PEFT with the same outputs, both ways, for every task."""

from __future__ import annotations

import copy
import warnings

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_prefix_tuning import PrefixTuningConfig

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
    return tiny_bert().bert


# name: (model builder, task, the output compared, whether the model takes token_type_ids)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM", "logits", False),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", "logits", False),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS", "logits", True),
    "llama-seq-cls": (lambda: tiny_llama(num_labels=3), "SEQ_CLS", "logits", False),
    "bert-token-cls": (lambda: tiny_bert(task="token_cls"), "TOKEN_CLS", "logits", True),
    "bert-qa": (tiny_bert_qa, "QUESTION_ANS", "start_logits", False),
    "bert-features": (tiny_bert_bare, "FEATURE_EXTRACTION", "last_hidden_state", False),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", "logits", False),
}
# with and without the MLP that reparameterises the prefix while training
PROJECTIONS = {"direct": {}, "projected": {"prefix_projection": True, "encoder_hidden_size": 24}}


def inputs(task, token_types=False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = dict(input_ids=ids, attention_mask=mask)
    if task == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = torch.randint(2, 128, (2, 4), generator=generator)
        out["decoder_attention_mask"] = torch.ones_like(out["decoder_input_ids"])
    if token_types:  # PEFT passes them on unchanged for classification
        out["token_type_ids"] = (torch.arange(9) >= 5).long().expand(2, 9)
    return out


def output(model, case):
    _, task, name, token_types = CASES[case]
    with torch.no_grad():
        return getattr(model(**inputs(task, token_types)), name)


def config_kwargs(task, projection="direct"):
    return dict(task_type=task, num_virtual_tokens=3, **PROJECTIONS[projection])


def silently(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about deprecated transformers attributes
        return call()


@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, projection, tmp_path):
    build, task, _, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    plain = output(pristine, case)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, PrefixTuningConfig(**config_kwargs(task, projection))), scale=0.5
    )
    expected = output(ours, case)
    ours.save_pretrained(tmp_path)

    theirs = silently(lambda: peft.PeftModel.from_pretrained(pristine, tmp_path))
    torch.testing.assert_close(output(theirs, case), expected, **TOL)
    # the prefix changes the outputs: the comparison is not base model against base model
    assert not torch.allclose(plain, expected, atol=1e-3)


@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, projection, tmp_path):
    build, task, _, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    plain = output(pristine, case)
    theirs = silently(
        lambda: peft.get_peft_model(base, peft.PrefixTuningConfig(**config_kwargs(task, projection)))
    )
    randomize_trainable(theirs, scale=0.5)
    expected = output(theirs, case)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(output(ours, case), expected, **TOL)
    assert not torch.allclose(plain, expected, atol=1e-3)
