"""A LoKr adapter computes the same bits trainable or frozen, so a saved and reloaded one matches exactly.

``torch.matmul`` of a matrix with a batch picks its kernel by whether the matrix requires grad (one
folded ``mm`` then, a broadcast ``bmm`` otherwise, even under ``no_grad``), and the two sum in different
orders. The linear forward once multiplied ``W1`` straight into the batch of input blocks, so an adapter
loaded frozen by ``from_pretrained`` gave outputs an ulp away from the trained one it was saved from.
"""

from __future__ import annotations

import copy

import peftkit
import pytest
import torch
from peftkit_lokr import LoKrConfig
from torch import nn


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def randomize(model: peftkit.PeftModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lokr_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


# Sizes and inputs where the matrix-times-batch product gave different bits trainable and frozen; kept
# full (r large against each factor), W1 is the stored tensor itself, which the product saw directly.
SHAPES = {
    "16 as 4x4 by 4x4": (16, 16, dict(r=8, decompose_factor=4), (2, 3, 16)),
    "32 in, 64 out": (32, 64, dict(r=16), (2, 5, 32)),
    "a 4-d input": (16, 32, dict(r=8, decompose_factor=4), (2, 2, 3, 16)),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_outputs_are_the_same_bits_whether_the_tensors_require_grad(shape):
    in_features, out_features, fields, input_shape = SHAPES[shape]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        Wrap(nn.Linear(in_features, out_features)).eval(),
        LoKrConfig(target_modules=["layer"], init_weights=False, **fields),
    )
    lokr = model.base_model.model.layer
    assert "default" in lokr.lokr_w1  # a stored W1, not a product of two factors
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for trainable in (True, False):
        for _, param in lokr.adapter_parameters("default"):
            param.requires_grad_(trainable)
        with torch.no_grad():
            outputs[trainable] = model(x)
    assert torch.equal(outputs[True], outputs[False])


@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_saved_and_reloaded_adapter_gives_the_same_bits(tmp_path, is_trainable):
    # the configuration of the conformance kit's failing draw: 16 features as 4 x 4, both factors full
    torch.manual_seed(0)
    base = Wrap(nn.Linear(16, 16)).eval()
    config = LoKrConfig(target_modules=["layer"], r=2, alpha=1, decompose_both=True, decompose_factor=4)
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(2))
    model = peftkit.get_peft_model(copy.deepcopy(base), config)
    randomize(model, seed=3)
    with torch.no_grad():
        saved = model(x)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=is_trainable)
    assert all(p.requires_grad == is_trainable for n, p in loaded.named_parameters() if "lokr_" in n)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved)
