"""QLoRA end to end: LoRA and DoRA on 4-bit (nf4, fp4, with and without double quantization) and 8-bit bases.

Saving and DoRA's initialisation also run over both of bitsandbytes' 4-bit CPU layouts (conftest.py).
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from peftkit import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

QUANTIZED_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def lora_config(use_dora: bool) -> LoraConfig:
    return LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, task_type="CAUSAL_LM"
    )


def train(model, tokens, steps: int = 8, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_on_a_quantized_base_trains_saves_and_reloads(
    load_quantized, tokens, tmp_path, kind, use_dora, device
):
    tokens = tokens.to(device)
    base = prepare_model_for_kbit_training(
        load_quantized(kind, device), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    model = get_peft_model(base, lora_config(use_dora))
    wrapped = [layer.get_base_layer() for _, layer in model.adapter_layers()]
    assert wrapped and all(isinstance(layer, QUANTIZED_TYPES) for layer in wrapped)

    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.grad is not None for p in trainable.values())
    # B starts at zero, so only B (and DoRA's magnitude) get a non-zero gradient on the first step
    moving = [p for name, p in trainable.items() if "lora_B" in name or "magnitude" in name]
    assert moving and all(p.grad.abs().sum() > 0 for p in moving)
    model.zero_grad()

    losses = train(model, tokens)
    assert losses[-1] < 0.9 * losses[0]

    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_quantized(kind, device), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_saving_writes_the_same_adapter_and_leaves_the_base_in_either_layout(
    load_quantized, tokens, tmp_path, pack, four_bit_kind, layout, use_dora
):
    model = get_peft_model(load_quantized(four_bit_kind), lora_config(use_dora))
    train(model, tokens, steps=2)  # in train mode, so the layers stay in the standard layout
    model.save_pretrained(tmp_path / "before")
    if layout == "packed":
        pack(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]

    def snapshot():
        return [
            (m.weight.data.clone(), m.weight.quant_state.absmax.clone(), m.weight.quant_state) for m in layers
        ]

    before = snapshot()
    model.save_pretrained(tmp_path / "after")
    for (codes, absmax, state), (codes_now, absmax_now, state_now) in zip(before, snapshot()):
        assert state_now is state and torch.equal(codes_now, codes) and torch.equal(absmax_now, absmax)
    assert all(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) == (layout == "packed")
        for m in layers
    )
    saved, expected = (
        load_file(tmp_path / name / "adapter_model.safetensors") for name in ("after", "before")
    )
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)


def test_dora_magnitude_starts_at_the_norms_of_the_weights_the_layers_compute_with(
    load_quantized, in_layout, four_bit_kind, layout
):
    base, reference = in_layout(load_quantized(four_bit_kind), layout)
    expected = {
        name: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).norm(dim=1)
        for name, m in reference.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    model = get_peft_model(base, lora_config(use_dora=True))
    for name, layer in model.adapter_layers():
        torch.testing.assert_close(
            layer.lora_magnitude_vector["default"].detach(), expected[name], rtol=1e-6, atol=0
        )


def adapter_gradients(model, tokens) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_training_after_an_eval_forward_gets_the_gradients_it_got_before(load_quantized, tokens, four_bit_kind):
    """bitsandbytes packs a 4-bit layer at its first eval forward without grad on CPUs with AVX512-BF16,
    and its packed kernel has no backward: a later training step would lose the gradient through every
    4-bit layer (measured 77 % off). peftkit-bnb keeps layers that carry adapters out of that layout."""
    config = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    fresh = get_peft_model(load_quantized(four_bit_kind), config)
    torch.manual_seed(0)
    evaluated = get_peft_model(load_quantized(four_bit_kind), config)
    evaluated.eval()
    with torch.no_grad():
        evaluated(input_ids=tokens)  # an evaluation loop's forward
    layers = [layer.get_base_layer() for _, layer in evaluated.adapter_layers()]
    assert layers and all(not layer.support_avx512bf16_for_cpu for layer in layers)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    expected, got = adapter_gradients(fresh, tokens), adapter_gradients(evaluated, tokens)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_base_packed_before_the_adapter_is_unpacked_with_the_weights_it_computed_with(
    load_quantized, tokens, pack, with_bf16_absmax, exact_logits, four_bit_kind
):
    """A base model evaluated before get_peft_model is packed already: its layers go back to the standard
    layout with the same codes and their bf16-rounded absmaxes (not quantized again), so they compute
    with the weights they had, and they train."""
    base = load_quantized(four_bit_kind)
    reference = with_bf16_absmax(base)
    model = get_peft_model(pack(base), LoraConfig(r=8, target_modules="all-linear"))
    layers = [layer.get_base_layer() for _, layer in model.adapter_layers()]
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    assert torch.equal(exact_logits(model, tokens), exact_logits(reference, tokens))
    gradients = adapter_gradients(model, tokens)
    assert any(g.abs().sum() > 0 for name, g in gradients.items() if "lora_B" in name)
