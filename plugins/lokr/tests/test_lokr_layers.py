"""The LoKr layer: factorisation, factor shapes, init, forward against a dense reference, merging, dropout."""

from __future__ import annotations

import math

import peftkit
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization
from peftkit import TargetModulesError
from peftkit.testing.models import tiny_gpt2, tiny_llama, tiny_plain
from peftkit_lokr import LoKrConfig, LoKrLayer, factorization
from torch import nn


class Wrap(nn.Module):
    """One layer as a model, so get_peft_model can target it by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def adapted(layer: nn.Module, **fields) -> tuple[nn.Module, LoKrLayer]:
    torch.manual_seed(0)
    model = peftkit.get_peft_model(Wrap(layer).eval(), LoKrConfig(target_modules=["layer"], **fields))
    return model, model.base_model.model.layer


def randomized(lokr: LoKrLayer, scale: float = 0.3) -> LoKrLayer:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, param in lokr.adapter_parameters("default"):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return lokr


def reference_delta(lokr: LoKrLayer, weight_shape) -> torch.Tensor:
    """ΔW straight from the stored tensors with torch.kron, independent of the layer's own code."""
    p = dict(lokr.adapter_parameters("default"))
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        t, a, b = p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]
        # W2[p, q] = Σ_ij t[i, j] a[i, p] b[j, q], contracted one rank mode at a time
        w2 = torch.tensordot(torch.tensordot(t, a, dims=([0], [0])), b, dims=([0], [0])).permute(2, 3, 0, 1)
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # a 3-d W2 (Conv1d, kept full) goes into torch.kron as it is, exactly as PEFT passes it
    return (torch.kron(w1, w2.contiguous()) * lokr.scaling["default"]).reshape(weight_shape)


# --- factorisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dimension", "factor", "expected"),
    [
        (128, -1, (8, 16)),
        (256, -1, (16, 16)),
        (127, -1, (1, 127)),
        (12, -1, (3, 4)),
        (1, -1, (1, 1)),
        (128, 4, (4, 32)),
        (128, 32, (32, 4)),  # a factor that divides comes first as given, even when the larger
        (128, 3, (2, 64)),  # one that does not bounds the search instead
        (100, 7, (5, 20)),
    ],
)
def test_factorization_worked_examples(dimension, factor, expected):
    assert factorization(dimension, factor) == expected


def test_factorization_agrees_with_peft_everywhere():
    for dimension in range(1, 1100):
        for factor in (-1, *range(1, 40)):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (
                dimension,
                factor,
            )


# --- which factors are full, and their shapes ----------------------------------------------------
# Linear(64 → 32): out 32 = 4 · 8, in 64 = 8 · 8, so W1 is 4 × 8 and W2 is 8 × 8. A factor is kept full
# once r reaches half its larger side (4 for both here); W1 is only ever factored with decompose_both.
@pytest.mark.parametrize(
    ("r", "decompose_both", "expected"),
    [
        (4, False, {"lokr_w1": (4, 8), "lokr_w2": (8, 8)}),
        (3, False, {"lokr_w1": (4, 8), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}),
        (4, True, {"lokr_w1": (4, 8), "lokr_w2": (8, 8)}),
        (
            3,
            True,
            {"lokr_w1_a": (4, 3), "lokr_w1_b": (3, 8), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)},
        ),
    ],
)
def test_linear_factor_shapes(r, decompose_both, expected):
    _, lokr = adapted(nn.Linear(64, 32), r=r, decompose_both=decompose_both)
    assert {name: tuple(p.shape) for name, p in lokr.adapter_parameters("default")} == expected


# Conv2d(16 → 32, 3×3): out 32 = 4 · 8, in 16 = 4 · 4; W2 is 8 × 4 × 3 × 3, factored for r < 4.
@pytest.mark.parametrize(
    ("layer", "fields", "expected"),
    [
        (nn.Conv2d(16, 32, 3), dict(r=4), {"lokr_w1": (4, 4), "lokr_w2": (8, 4, 3, 3)}),
        (nn.Conv2d(16, 32, 3), dict(r=2), {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 36)}),
        (
            nn.Conv2d(16, 32, 3),
            dict(r=2, use_effective_conv2d=True),
            {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 4)},
        ),
        # a 1×1 kernel never takes the CP form
        (
            nn.Conv2d(16, 32, 1),
            dict(r=2, use_effective_conv2d=True),
            {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 4)},
        ),
        # grouped: the input size is per group, 16 / 2 = 8 = 2 · 4
        (
            nn.Conv2d(16, 32, 3, groups=2),
            dict(r=2),
            {"lokr_w1": (4, 2), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 36)},
        ),
        # Conv1d, kernel 5: its CP core is stored as (r, r, 5, 1), as PEFT stores it
        (
            nn.Conv1d(16, 32, 5),
            dict(r=2, use_effective_conv2d=True),
            {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 5, 1), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 4)},
        ),
        (nn.Conv1d(16, 32, 5), dict(r=2), {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 20)}),
        # decompose_factor 2 splits 32 as 2 · 16 and 16 as 2 · 8
        (
            nn.Conv2d(16, 32, 3),
            dict(r=4, decompose_factor=2),
            {"lokr_w1": (2, 2), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 72)},
        ),
    ],
)
def test_conv_factor_shapes(layer, fields, expected):
    _, lokr = adapted(layer, **fields)
    assert {name: tuple(p.shape) for name, p in lokr.adapter_parameters("default")} == expected


# --- init ----------------------------------------------------------------------------------------
LAYERS = {
    "linear": (lambda: nn.Linear(64, 32), lambda: torch.randn(3, 5, 64)),
    "conv2d": (lambda: nn.Conv2d(16, 32, 3, padding=1), lambda: torch.randn(2, 16, 6, 6)),
    "conv2d-grouped-strided": (
        lambda: nn.Conv2d(16, 32, 3, stride=2, groups=4, dilation=2, padding=2),
        lambda: torch.randn(2, 16, 9, 9),
    ),
    "conv1d": (lambda: nn.Conv1d(16, 32, 5, padding="same"), lambda: torch.randn(2, 16, 7)),
}
VARIANTS = {
    "full": dict(r=8),
    "factored": dict(r=2, decompose_both=True),
    "effective-conv": dict(r=1, decompose_both=True, use_effective_conv2d=True, decompose_factor=2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("init", [True, "lycoris"])
def test_a_fresh_adapter_is_the_identity(kind, variant, init):
    make_layer, make_input = LAYERS[kind]
    base = make_layer()
    x = make_input()
    expected = base(x)
    model, lokr = adapted(base, init_weights=init, **VARIANTS[variant])
    zero = "lokr_w1" if init is True else "lokr_w2"
    assert any(name.startswith(zero) and not p.any() for name, p in lokr.adapter_parameters("default"))
    assert torch.equal(model(x), expected)


def test_init_weights_false_gives_an_adapter_that_acts():
    base = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    expected = base(x)
    model, lokr = adapted(base, init_weights=False, r=2, decompose_both=True)
    assert all(p.any() for _, p in lokr.adapter_parameters("default"))
    assert not torch.allclose(model(x), expected)


# --- forward and merge ---------------------------------------------------------------------------
def _base_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    return conv(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_forward_is_the_layer_with_w_plus_delta_and_merging_agrees(kind, variant):
    make_layer, make_input = LAYERS[kind]
    model, lokr = adapted(make_layer(), alpha=4, **VARIANTS[variant])
    randomized(lokr)
    base = lokr.get_base_layer()
    x = make_input()
    weight = base.weight.detach().clone()
    delta = reference_delta(lokr, weight.shape)
    with torch.no_grad():
        unmerged = model(x)
        expected = _base_forward(base, x, weight + delta)
        scale = expected.abs().max().item()
        assert not torch.allclose(unmerged, _base_forward(base, x, weight), atol=1e-3)  # the adapter acts
        assert (unmerged - expected).abs().max().item() <= 1e-5 * scale
        torch.testing.assert_close(lokr.delta_weight("default"), delta, rtol=1e-6, atol=1e-7)
        model.merge_adapter()
        assert (model(x) - unmerged).abs().max().item() <= 1e-5 * scale
        model.unmerge_adapter()
        torch.testing.assert_close(base.weight, weight, rtol=1e-6, atol=1e-6)


def test_a_linear_forward_never_forms_the_dense_delta(monkeypatch):
    model, lokr = adapted(nn.Linear(64, 32), r=2)
    randomized(lokr)
    x = torch.randn(4, 64)
    expected = F.linear(
        x, lokr.get_base_layer().weight + reference_delta(lokr, (32, 64)), lokr.get_base_layer().bias
    )

    def refuse(*args):
        raise AssertionError("delta_weight called in a linear forward")

    monkeypatch.setattr(lokr, "delta_weight", refuse)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_scaling_is_alpha_over_r_with_patterns():
    model = peftkit.get_peft_model(
        tiny_llama(),
        LoKrConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 2},
        ),
    )
    layers = dict(model.adapter_layers())
    q = layers["model.layers.0.self_attn.q_proj"]
    v = layers["model.layers.0.self_attn.v_proj"]
    assert (q.r["default"], q.scaling["default"]) == (4, 0.5)
    assert (v.r["default"], v.scaling["default"]) == (2, 4.0)


# --- dropout in training ---------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_rank_dropout_drops_whole_output_rows_of_the_delta(kind, rescale):
    make_layer, make_input = LAYERS[kind]
    model, lokr = adapted(make_layer(), r=2, rank_dropout=0.5, rank_dropout_scale=rescale)
    randomized(lokr)
    x = make_input()
    channel = -1 if kind == "linear" else 1
    with torch.no_grad():
        base_out = lokr.get_base_layer()(x)
        full_delta = (model(x) - base_out).movedim(channel, 0).flatten(1)
        model.train()
        torch.manual_seed(1)
        delta = (model(x) - base_out).movedim(channel, 0).flatten(1)
    kept = delta.abs().amax(dim=1) > 0
    assert 0 < int(kept.sum()) < kept.numel()
    factor = kept.numel() / int(kept.sum()) if rescale else 1.0
    torch.testing.assert_close(delta[kept], full_delta[kept] * factor, rtol=1e-5, atol=1e-5)


def test_module_dropout_skips_the_adapter_in_training_only():
    model, lokr = adapted(nn.Linear(64, 32), r=2, module_dropout=0.75)
    randomized(lokr)
    x = torch.randn(2, 64)
    with torch.no_grad():
        base_out = lokr.get_base_layer()(x)
        assert all(not torch.equal(model(x), base_out) for _ in range(20))  # eval: never skipped
        model.train()
        torch.manual_seed(0)
        skipped = sum(torch.equal(model(x), base_out) for _ in range(400))
    assert 250 <= skipped <= 350  # 300 expected; a binomial(400, 0.75) is this far off with p < 1e-5


# --- what it adapts ------------------------------------------------------------------------------
def test_gpt2_conv1d_is_refused_as_peft_refuses_it():
    with pytest.raises(TargetModulesError, match=r"LoKr cannot adapt a Conv1D layer \(transformers' Conv1D"):
        peftkit.get_peft_model(tiny_gpt2(), LoKrConfig(target_modules=["c_attn"]))


def test_embeddings_are_refused_naming_the_supported_kinds():
    with pytest.raises(
        TargetModulesError, match="lokr cannot adapt a embedding layer; it adapts: linear, conv1d, conv2d"
    ):
        peftkit.get_peft_model(tiny_plain(), LoKrConfig(target_modules=["embed"]))


def test_default_targets_by_model_type():
    model = peftkit.get_peft_model(tiny_llama(), LoKrConfig())
    assert sorted({path.rsplit(".", 1)[1] for path, _ in model.adapter_layers()}) == ["q_proj", "v_proj"]
    with pytest.raises(TargetModulesError, match="peftkit-lokr has no default for model_type None"):
        peftkit.get_peft_model(tiny_plain(), LoKrConfig())


def test_delete_adapter_clears_its_tensors_and_state():
    model, lokr = adapted(nn.Linear(64, 32), r=2)
    model.add_adapter("other", LoKrConfig(target_modules=["layer"], r=1, decompose_both=True))
    model.delete_adapter("other")
    for name in LoKrLayer.adapter_tensor_names + LoKrLayer.adapter_state_names:
        assert "other" not in getattr(lokr, name), name
    assert lokr.holds("default") and math.isclose(lokr.scaling["default"], 4.0)
