"""IA3 and LoRA adapters on the same layers: either may be the inner wrapper, and each sees the other.

With IA3 inside, the layer computes ``LoRA(IA3(x)) = IA3(x) + s · B A x``; with IA3 outside it scales what
the LoRA layer computes: ``(W x + b + s · B A x) ⊙ l``, or ``LoRA(x ⊙ l)`` for a feed-forward layer.
"""

from __future__ import annotations

import pytest
import torch
from peftkit import MergeNotSupportedError, get_peft_model
from peftkit.testing.models import tiny_plain
from peftkit_ia3 import IA3Config, IA3Layer
from peftkit_lora import LoraConfig, LoraLayer

IA3 = IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"], init_ia3_weights=False)
LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)


def stacked(ia3_inside: bool):
    """A plain model with an IA3 adapter "ia3" and a LoRA adapter "lora" on fc1 and fc2, both active."""
    torch.manual_seed(0)
    first, second = ("ia3", IA3), ("lora", LORA)
    if not ia3_inside:
        first, second = second, first
    model = get_peft_model(tiny_plain(), first[1], adapter_name=first[0])
    model.add_adapter(*second)
    model.set_adapter(["ia3", "lora"])
    return model


def lora_delta(lora: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    return lora.lora_B["lora"](lora.lora_A["lora"](x)) * lora.scaling["lora"]


def ia3_vector(layer: IA3Layer) -> torch.Tensor:
    return layer.ia3_l["ia3"].detach().flatten()


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_lora_around_ia3_adds_its_delta_to_the_scaled_layer(name):
    model = stacked(ia3_inside=True)
    lora = model.base_model.model.get_submodule(name)
    assert isinstance(lora, LoraLayer) and isinstance(lora.base_layer, IA3Layer)
    ia3, linear = lora.base_layer, lora.get_base_layer()
    x = torch.randn(2, 3, linear.in_features)
    with torch.no_grad():
        scaled = linear(x * ia3_vector(ia3)) if name == "fc2" else linear(x) * ia3_vector(ia3)
        torch.testing.assert_close(lora(x), scaled + lora_delta(lora, x))


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_ia3_around_lora_scales_the_whole_lora_layer(name):
    model = stacked(ia3_inside=False)
    ia3 = model.base_model.model.get_submodule(name)
    assert isinstance(ia3, IA3Layer) and isinstance(ia3.base_layer, LoraLayer)
    lora, linear = ia3.base_layer, ia3.get_base_layer()
    assert tuple(ia3.ia3_l["ia3"].shape) == (
        (1, linear.in_features) if name == "fc2" else (linear.out_features, 1)
    )
    x = torch.randn(2, 3, linear.in_features)
    with torch.no_grad():
        if name == "fc2":
            h = x * ia3_vector(ia3)
            expected = linear(h) + lora_delta(lora, h)
        else:
            expected = (linear(x) + lora_delta(lora, x)) * ia3_vector(ia3)
        torch.testing.assert_close(ia3(x), expected)


# No tie warning: an outer layer shows its base layer's weight, which the core does not count as a tie.
@pytest.mark.filterwarnings("error:merging into .* whose weight is tied:UserWarning")
@pytest.mark.parametrize("ia3_inside", [True, False], ids=["ia3-inside", "ia3-outside"])
def test_merging_inner_adapters_first_gives_the_same_outputs_and_unmerge_gives_back_the_weights(ia3_inside):
    model = stacked(ia3_inside)
    inner, outer = ("ia3", "lora") if ia3_inside else ("lora", "ia3")
    ids = torch.randint(1, 128, (2, 5))
    weights = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged = model(input_ids=ids)
        model.merge_adapter([inner])
        torch.testing.assert_close(model(input_ids=ids), unmerged, rtol=1e-5, atol=1e-5)
        model.merge_adapter([outer])
        torch.testing.assert_close(model(input_ids=ids), unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids), unmerged, rtol=1e-5, atol=1e-5)
    for key, value in weights.items():
        torch.testing.assert_close(model.base_model.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_ia3_outside_refuses_to_merge_before_the_lora_inside_it():
    model = stacked(ia3_inside=False)
    ids = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids)
        with pytest.raises(MergeNotSupportedError) as info:
            model.merge_adapter(["ia3"])
        assert (
            "cannot merge adapter 'ia3' while adapter 'lora', which wraps the same layer beneath it, stays "
            "active and unmerged" in str(info.value)
        )
        torch.testing.assert_close(model(input_ids=ids), before, rtol=0, atol=0)
