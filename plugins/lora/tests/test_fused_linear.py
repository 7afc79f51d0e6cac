"""The fused LoRA node (peftkit_lora.fused) computes what the plain modules compute, and keeps less for backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import LoraConfig, get_peft_model
from peftkit.testing.models import tiny_llama
from peftkit_lora import fused
from peftkit_lora.layer import LoraLayer


def plain(result, x, a, b, scaling, p, seed):
    """The plain path's math, with the fused node's mask for the same seed."""
    h = x * fused.dropout_mask(x, p, seed) if p > 0 else x
    return result + (h @ a.T @ b.T) * scaling


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    r=st.integers(1, 5),
    scaling=st.floats(0.1, 4.0),
    p=st.sampled_from([0.0, 0.25, 0.6]),
    seed=st.integers(0, 2**31),
    batched=st.booleans(),
)
def test_fused_node_matches_plain_math_in_value_and_gradient(
    rows, in_features, out_features, r, scaling, p, seed, batched
):
    torch.manual_seed(seed)
    shape = (2, rows) if batched else (rows,)
    tensors = [
        torch.randn(*shape, out_features, dtype=torch.float64),
        torch.randn(*shape, in_features, dtype=torch.float64),
        torch.randn(r, in_features, dtype=torch.float64),
        torch.randn(out_features, r, dtype=torch.float64),
    ]
    fused_inputs = [t.clone().requires_grad_(True) for t in tensors]
    plain_inputs = [t.clone().requires_grad_(True) for t in tensors]
    out = fused.LoraLinear.apply(*fused_inputs, scaling, p, seed)
    expected = plain(*plain_inputs, scaling, p, seed)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(expected)
    out.backward(upstream)
    expected.backward(upstream)
    for got, want in zip(fused_inputs, plain_inputs):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_fused_node_passes_gradcheck(p):
    torch.manual_seed(0)
    inputs = [
        torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *t: fused.LoraLinear.apply(*t, 1.5, p, 1234), inputs)


def lora_llama(dropout: float):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(tiny_llama(seed=0), config).train()


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_lora_model_trains_the_same_with_and_without_the_fused_node(monkeypatch):
    model = lora_llama(dropout=0.0)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    fused_loss, fused_grads = loss_and_grads(model, ids)
    monkeypatch.setattr(LoraLayer, "use_fused_linear", False)
    plain_loss, plain_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():
        plain_logits = model(input_ids=ids).logits
        monkeypatch.setattr(LoraLayer, "use_fused_linear", True)
        torch.testing.assert_close(model(input_ids=ids).logits, plain_logits, rtol=1e-5, atol=1e-6)


def test_fused_dropout_repeats_under_the_same_seed_and_differs_from_no_dropout():
    model = lora_llama(dropout=0.5)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    first = model(input_ids=ids).logits
    torch.manual_seed(7)
    again = model(input_ids=ids).logits
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    model.eval()
    assert not torch.allclose(model(input_ids=ids).logits, first)


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps while the model's loss is built."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return sum(storages.values())


def test_with_dropout_the_fused_node_keeps_no_mask_and_no_dropped_copy(monkeypatch):
    """Plain LoRA keeps, per adapted layer, a dropped copy of its input and the mask: 5 bytes an input
    element. The fused node keeps the input itself (4 bytes, shared by layers that read one input: q, k
    and v; gate and up), so on a Llama block it keeps about half of what plain LoRA adds to the base."""
    model = lora_llama(dropout=0.1)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    fused_bytes = saved_bytes(model, ids)
    with model.disable_adapter():
        base_bytes = saved_bytes(model, ids)
    monkeypatch.setattr(LoraLayer, "use_fused_linear", False)
    plain_bytes = saved_bytes(model, ids)
    assert base_bytes < fused_bytes < plain_bytes
    assert fused_bytes - base_bytes <= 0.6 * (plain_bytes - base_bytes)
