"""P-tuning adapters move between peftkit and PEFT with the same outputs and generations, both ways."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_p_tuning import PromptEncoderConfig
from safetensors.torch import load_file

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)

# name: (model builder, task, the output compared, whether the model takes token_type_ids)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM", "logits", False),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", "logits", False),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS", "logits", True),
    "bert-token-cls": (lambda: tiny_bert(task="token_cls"), "TOKEN_CLS", "logits", True),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", "logits", False),
}
ENCODERS = {
    "mlp": dict(encoder_reparameterization_type="MLP", encoder_hidden_size=24),
    "lstm": dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=12),
}


def inputs(task, token_types=False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = dict(input_ids=ids, attention_mask=mask)
    if task == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = torch.randint(2, 128, (2, 4), generator=generator)
    if token_types:  # PEFT keeps them for classification, with zeros for the virtual tokens
        out["token_type_ids"] = (torch.arange(9) >= 5).long().expand(2, 9)
    return out


def output(model, case):
    _, task, name, token_types = CASES[case]
    with torch.no_grad():
        return getattr(model(**inputs(task, token_types)), name)


def settings(task, encoder):
    return dict(task_type=task, num_virtual_tokens=3, **ENCODERS[encoder])


def quietly(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about deprecated transformers attributes
        return call()


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, encoder, tmp_path):
    build, task, _, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    plain = output(pristine, case)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, PromptEncoderConfig(**settings(task, encoder))), scale=0.5
    )
    expected = output(ours, case)
    ours.save_pretrained(tmp_path)

    theirs = quietly(lambda: peft.PeftModel.from_pretrained(pristine, tmp_path))
    torch.testing.assert_close(output(theirs, case), expected, **TOL)
    assert plain.shape != expected.shape or not torch.allclose(plain, expected, atol=1e-3)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, encoder, tmp_path):
    build, task, _, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = quietly(lambda: peft.get_peft_model(base, peft.PromptEncoderConfig(**settings(task, encoder))))
    randomize_trainable(theirs, scale=0.5)
    expected = output(theirs, case)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(output(ours, case), expected, **TOL)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("case", ["llama", "t5"])
def test_the_same_untrained_encoder_gives_peft_s_outputs(case, encoder):
    """Same seed, same encoder weights: the encoder itself computes what PEFT's computes, while training."""
    build, task, _, _ = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    torch.manual_seed(7)
    ours = peftkit.get_peft_model(base, PromptEncoderConfig(**settings(task, encoder)))
    torch.manual_seed(7)
    theirs = quietly(
        lambda: peft.get_peft_model(pristine, peft.PromptEncoderConfig(**settings(task, encoder)))
    )
    mine = dict(ours.prompt_modules["default"].named_parameters())
    their_params = dict(theirs.prompt_encoder["default"].named_parameters())
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in their_params.items()}
    for name, param in mine.items():
        torch.testing.assert_close(param, their_params[name], rtol=0, atol=0)
    torch.testing.assert_close(output(ours, case), output(theirs, case), **TOL)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize(
    ("build", "task", "heads"),
    [
        (tiny_llama, "CAUSAL_LM", []),
        (tiny_bert, "SEQ_CLS", ["base_model.classifier.bias", "base_model.classifier.weight"]),
        (tiny_t5, "SEQ_2_SEQ_LM", []),
    ],
)
def test_files_hold_peft_s_keys_shapes_and_config(build, task, heads, encoder, tmp_path):
    base = build()
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, PromptEncoderConfig(**settings(task, encoder)))
    ours.save_pretrained(tmp_path / "ours")
    quietly(
        lambda: peft.get_peft_model(pristine, peft.PromptEncoderConfig(**settings(task, encoder)))
    ).save_pretrained(tmp_path / "theirs")
    mine, theirs = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "theirs"))
    assert sorted(mine) == sorted(theirs) == sorted(["prompt_embeddings", *heads])
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    rows = 3 * (2 if task == "SEQ_2_SEQ_LM" else 1)
    assert mine["prompt_embeddings"].shape == (rows, 32)
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
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
        "inference_mode",
    ):
        assert our_config[key] == their_config[key], key


# --- greedy generation ---------------------------------------------------------------------------
def generate(model, ids, mask, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns at every step that it drops generate's position_ids
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)


GENERATORS = {
    "llama": (lambda: tiny_llama(initializer_range=0.3), "CAUSAL_LM"),
    "gpt2": (lambda: tiny_gpt2(initializer_range=0.3), "CAUSAL_LM"),
    "t5": (lambda: tiny_t5(initializer_factor=3.0), "SEQ_2_SEQ_LM"),
}


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_greedy_tokens_equal_peft_s_both_ways(name, encoder, tmp_path):
    build, task = GENERATORS[name]
    ids = torch.randint(3, 120, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    base = build()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, PromptEncoderConfig(**settings(task, encoder))), scale=1.0
    )
    mine = generate(ours, ids, mask)
    ours.save_pretrained(tmp_path)
    theirs = quietly(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path))
    assert torch.equal(mine, generate(theirs, ids, mask))
    with ours.disable_adapter():
        assert not torch.equal(mine, generate(ours, ids, mask))
    # and PEFT's adapter generates PEFT's tokens here
    peft_trained = quietly(
        lambda: peft.get_peft_model(
            copy.deepcopy(pristine), peft.PromptEncoderConfig(**settings(task, encoder))
        )
    )
    randomize_trainable(peft_trained, seed=5, scale=1.0)
    expected = generate(peft_trained, ids, mask)
    peft_trained.save_pretrained(tmp_path / "theirs")
    assert torch.equal(
        generate(peftkit.PeftModel.from_pretrained(pristine, tmp_path / "theirs"), ids, mask), expected
    )
