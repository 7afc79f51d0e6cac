"""peftkit.prepare_model_for_kbit_training does what PEFT's function of that name does."""

from __future__ import annotations

import bitsandbytes as bnb
import peft
import torch
from peftkit import LoraConfig, get_peft_model, prepare_model_for_kbit_training


def checkpointing(model) -> bool:
    """transformers 5 names it activation checkpointing; transformers 4 gradient checkpointing."""
    if hasattr(model, "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def test_freezes_upcasts_small_parameters_and_enables_checkpointing(load_quantized):
    model = load_quantized("nf4", compute_dtype=torch.bfloat16)
    codes = {id(m.weight): m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert model.model.norm.weight.dtype == torch.bfloat16
    prepared = prepare_model_for_kbit_training(model)
    assert prepared is model
    assert not any(p.requires_grad for p in model.parameters())
    for param in model.parameters():
        if id(param) in codes:
            assert param.dtype == codes[id(param)]  # the packed 4-bit weights stay as they are
        else:
            assert param.dtype == torch.float32, param.shape
    assert checkpointing(model)
    embedded = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embedded.requires_grad  # so checkpointed blocks pass gradients back to adapters


def test_matches_peft_on_the_same_model(load_quantized):
    ours = prepare_model_for_kbit_training(load_quantized("nf4", compute_dtype=torch.bfloat16))
    theirs = peft.prepare_model_for_kbit_training(load_quantized("nf4", compute_dtype=torch.bfloat16))
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert ours_params.keys() == their_params.keys()
    for name, param in ours_params.items():
        assert (param.dtype, param.requires_grad) == (
            their_params[name].dtype,
            their_params[name].requires_grad,
        )
    assert checkpointing(ours) == checkpointing(theirs)


def test_checkpointing_can_be_off_or_non_reentrant(load_quantized):
    model = prepare_model_for_kbit_training(load_quantized("nf4"), use_gradient_checkpointing=False)
    assert not checkpointing(model)
    assert not model.get_input_embeddings()(torch.tensor([[1]])).requires_grad
    model = prepare_model_for_kbit_training(
        load_quantized("nf4"), gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert checkpointing(model)


def test_a_plain_model_is_frozen_but_not_checkpointed():
    from peftkit.testing.models import tiny_llama

    model = prepare_model_for_kbit_training(tiny_llama().to(torch.float16))
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not checkpointing(model)


def test_reentrant_checkpointing_passes_gradients_to_the_adapter(load_quantized, tokens):
    model = prepare_model_for_kbit_training(
        load_quantized("nf4"), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
