"""LoRA on a quantized base runs its adapter part as one node (peftkit_lora.fused.LoraLinear) after the base
layer's own call: values and gradients equal the plain modules', with and without dropout, under autocast.

With dropout, the plain path is given the node's masks: its dropout modules draw ``dropout_keep`` from the
same seeds, handed out in the same order, so both paths drop the same elements.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from peftkit import LoraConfig, get_peft_model
from peftkit_lora import fused
from peftkit_lora.layer import LoraLayer

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

# relative error in norm, as in peftkit_lora's autocast tests: 60 and 120 units of roundoff (bf16, fp16)
TOLERANCE = {None: 1e-5, torch.bfloat16: 0.12, torch.float16: 0.03}


def loss_and_grads(model, tokens, autocast_dtype, fused_node: bool, monkeypatch, dropout: float):
    seeds = itertools.count(1000)
    monkeypatch.setattr(fused, "new_seed", lambda: next(seeds))
    monkeypatch.setattr(LoraLayer, "use_fused_linear", fused_node)
    if not fused_node and dropout > 0:
        for _, layer in model.adapter_layers():
            # the plain path's nn.Dropout, given the node's mask for the next seed
            monkeypatch.setattr(
                layer.lora_dropout["default"],
                "forward",
                lambda x: x * fused.dropout_keep(x, dropout, next(seeds)) / (1 - dropout),
            )
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize(
    "autocast_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_the_quantized_fast_path_trains_as_the_plain_modules(
    load_quantized, tokens, kind, dropout, autocast_dtype, monkeypatch
):
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False
    )
    model = get_peft_model(load_quantized(kind), config).train()
    calls = []
    node = fused.LoraLinear.apply
    monkeypatch.setattr(fused.LoraLinear, "apply", lambda *args: calls.append(1) or node(*args))
    fast = loss_and_grads(model, tokens, autocast_dtype, True, monkeypatch, dropout)
    assert len(calls) == len(list(model.adapter_layers())), "every quantized layer's adapter ran in the node"
    plain = loss_and_grads(model, tokens, autocast_dtype, False, monkeypatch, dropout)
    assert len(calls) == len(list(model.adapter_layers())), "the plain path ran without the node"

    tolerance = TOLERANCE[autocast_dtype]
    assert relative_error(fast[0], plain[0]) <= tolerance
    assert fast[1].keys() == plain[1].keys() and fast[1]
    for name, expected in plain[1].items():
        assert fast[1][name].dtype == torch.float32, f"{name}: the float32 adapter's gradient is float32"
        assert relative_error(fast[1][name], expected) <= tolerance, name


def test_with_dropout_other_seeds_drop_other_elements_on_a_quantized_base(load_quantized, tokens):
    """The check above would pass with dropout ignored by both paths: here the mask must matter."""
    config = LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.5, init_lora_weights=False)
    model = get_peft_model(load_quantized("nf4"), config).train()
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(model(input_ids=tokens, labels=tokens).loss.item())
    assert losses[0] == losses[1] and losses[0] != losses[2]
