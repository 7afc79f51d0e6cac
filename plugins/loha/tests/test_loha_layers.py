"""The LoHa layer's math on each base layer kind, both forward paths, dropout, merging and dtypes."""

from __future__ import annotations

import copy

import peftkit
import pytest
import torch
import torch.nn.functional as F
from peftkit.testing.models import randomize_trainable
from peftkit_loha import LoHaConfig, LoHaLayer
from torch import nn


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (3, 5, 12)),
    "conv1d": (lambda: nn.Conv1d(6, 8, kernel_size=3, padding=1, stride=2), (2, 6, 11)),
    "conv1d-grouped": (lambda: nn.Conv1d(6, 9, kernel_size=2, dilation=2, groups=3), (2, 6, 10)),
    "conv2d": (lambda: nn.Conv2d(4, 6, kernel_size=(3, 2), padding=1), (2, 4, 7, 6)),
    "conv2d-grouped-strided": (lambda: nn.Conv2d(6, 8, kernel_size=3, stride=2, groups=2), (2, 6, 9, 9)),
    "conv2d-1x1": (lambda: nn.Conv2d(5, 7, kernel_size=1), (2, 5, 4, 4)),
}


def adapted(kind: str, r: int = 3, alpha: float = 6, scale: float = 0.4, **kwargs):
    build, shape = LAYERS[kind]
    torch.manual_seed(0)
    base = OneLayer(build()).eval()
    model = peftkit.get_peft_model(
        copy.deepcopy(base), LoHaConfig(r=r, alpha=alpha, target_modules=["layer"], **kwargs)
    )
    randomize_trainable(model, scale=scale)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return base, model, model.base_model.model.layer, x


def reference_delta(layer: LoHaLayer, name: str = "default") -> torch.Tensor:
    """ΔW straight from the definitions, written out index by index."""
    w1a, w1b = layer.hada_w1_a[name], layer.hada_w1_b[name]
    w2a, w2b = layer.hada_w2_a[name], layer.hada_w2_b[name]
    base = layer.get_base_layer()
    if name in layer.hada_t1:  # Tucker factors: W[p, q, k, l] = Σ_ij wa[i, p] t[i, j, k, l] wb[j, q]
        t1, t2 = layer.hada_t1[name], layer.hada_t2[name]
        first = torch.einsum("ijkl,ip,jq->pqkl", t1, w1a, w1b)
        second = torch.einsum("ijkl,ip,jq->pqkl", t2, w2a, w2b)
    else:
        first, second = w1a @ w1b, w2a @ w2b
    return (first * second * layer.alpha[name] / layer.r[name]).reshape(base.weight.shape)


def base_op(layer: LoHaLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    base = layer.get_base_layer()
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    return conv(
        x, weight, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups
    )


PEFT_SHAPES = {  # (w1a, w1b, t1) with r = 3, as PEFT lays them out
    ("linear", False): ((10, 3), (3, 12), None),
    ("conv1d", False): ((8, 3), (3, 18), None),
    ("conv1d", True): ((3, 8), (3, 6), (3, 3, 3, 1)),
    ("conv1d-grouped", True): ((3, 9), (3, 2), (3, 3, 2, 1)),
    ("conv2d", True): ((3, 6), (3, 4), (3, 3, 3, 2)),
    ("conv2d-grouped-strided", False): ((8, 3), (3, 27), None),
    ("conv2d-1x1", True): ((7, 3), (3, 5), None),  # no decomposition for a 1 × 1 kernel
}


@pytest.mark.parametrize("kind, effective", sorted(PEFT_SHAPES))
def test_tensor_shapes(kind, effective):
    _, _, layer, _ = adapted(kind, use_effective_conv2d=effective)
    w1a, w1b, t1 = PEFT_SHAPES[kind, effective]
    assert tuple(layer.hada_w1_a["default"].shape) == tuple(layer.hada_w2_a["default"].shape) == w1a
    assert tuple(layer.hada_w1_b["default"].shape) == tuple(layer.hada_w2_b["default"].shape) == w1b
    if t1 is None:
        assert "default" not in layer.hada_t1 and "default" not in layer.hada_t2
    else:
        assert tuple(layer.hada_t1["default"].shape) == tuple(layer.hada_t2["default"].shape) == t1


CASES = [(kind, effective) for kind in LAYERS for effective in (False, True)]


@pytest.mark.parametrize("kind, effective", CASES)
@pytest.mark.parametrize("path", ["factors", "dense"])
def test_both_forward_paths_apply_delta_weight(kind, effective, path, monkeypatch):
    base, model, layer, x = adapted(kind, use_effective_conv2d=effective)
    expected_delta = reference_delta(layer)
    torch.testing.assert_close(layer.delta_weight("default"), expected_delta, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(LoHaLayer, "forms_delta", lambda self, name: path == "dense")
    with torch.no_grad():
        out = model(x)
        expected = base(x) + base_op(layer, x, expected_delta)
        scale = expected.abs().max()
        assert (base_op(layer, x, expected_delta)).abs().max() > 0.05 * scale  # the adapter matters here
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * scale)


def test_forward_uses_the_rank_r2_factors_only_where_cheaper():
    layer = adapted("linear", r=2)[2]  # 4 · (12 + 10) = 88 < 120 multiply-adds per token
    assert not layer.forms_delta("default")
    layer = adapted("linear", r=3)[2]  # 9 · 22 = 198 > 120: forms ΔW, as PEFT always does
    assert layer.forms_delta("default")
    big = peftkit.get_peft_model(OneLayer(nn.Linear(256, 256)), LoHaConfig(r=8, target_modules=["layer"]))
    assert not big.base_model.model.layer.forms_delta("default")


@pytest.mark.parametrize("kind, effective", CASES)
def test_merged_agrees_with_unmerged_and_unmerge_restores(kind, effective):
    base, model, layer, x = adapted(kind, use_effective_conv2d=effective)
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5 * unmerged.abs().max())
        torch.testing.assert_close(
            layer.get_base_layer().weight, weight + reference_delta(layer), rtol=0, atol=1e-6
        )
        model.unmerge_adapter()
        torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_identity_at_init_and_random_when_asked(kind):
    base, _, _, x = adapted(kind)
    fresh = peftkit.get_peft_model(copy.deepcopy(base), LoHaConfig(r=3, target_modules=["layer"]))
    with torch.no_grad():
        assert torch.equal(fresh(x), base(x))
    noisy = peftkit.get_peft_model(
        copy.deepcopy(base), LoHaConfig(r=3, target_modules=["layer"], init_weights=False)
    )
    assert noisy.base_model.model.layer.hada_w2_b["default"].abs().sum() > 0
    with torch.no_grad():
        assert (noisy(x) - base(x)).abs().max() > 1e-4


def test_scaling_is_alpha_over_r_with_patterns():
    model = peftkit.get_peft_model(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv2d(2, 2, 3)),
        LoHaConfig(
            r=4, alpha=8, target_modules=["0", "1", "2"], rank_pattern={"1": 2}, alpha_pattern={"2": 2}
        ),
    )
    layers = {path: layer for path, layer in model.adapter_layers()}
    assert {p: (lay.r["default"], lay.scaling["default"]) for p, lay in layers.items()} == {
        "0": (4, 2.0),
        "1": (2, 4.0),
        "2": (4, 0.5),
    }


def test_rank_dropout_zeroes_output_rows_and_rescales_the_rest():
    base, model, layer, x = adapted("linear", r=2, rank_dropout=0.5)
    with torch.no_grad():
        delta = base_op(layer, x, reference_delta(layer))
        model.train()
        kept_counts = set()
        for seed in range(5):
            torch.manual_seed(seed)
            change = model(x) - base(x)
            kept = change.abs().amax(dim=(0, 1)) > 0
            kept_counts.add(int(kept.sum()))
            rescale = kept.numel() / kept.sum()
            torch.testing.assert_close(change[..., kept], delta[..., kept] * rescale, rtol=1e-5, atol=1e-6)
        assert any(0 < count < 10 for count in kept_counts)  # rows were dropped, not all of them
        assert len(kept_counts) > 1  # each training forward draws a new mask
        model.eval()
        torch.testing.assert_close(model(x) - base(x), delta, rtol=1e-5, atol=1e-6)


def test_rank_dropout_of_every_row_gives_the_base_output_not_nan():
    torch.manual_seed(0)
    base = OneLayer(nn.Linear(3, 1))
    model = peftkit.get_peft_model(
        copy.deepcopy(base), LoHaConfig(r=2, target_modules=["layer"], rank_dropout=0.9, init_weights=False)
    ).train()
    x = torch.randn(4, 3)
    all_dropped = 0
    with torch.no_grad():
        for seed in range(20):
            torch.manual_seed(seed)
            out = model(x)
            assert torch.isfinite(out).all()
            all_dropped += torch.equal(out, base(x))
    assert all_dropped > 0


def test_module_dropout_skips_the_whole_adapter_in_training_only():
    base, model, layer, x = adapted("conv2d", module_dropout=0.5)
    with torch.no_grad():
        adapted_out, base_out = model(x), base(x)
        model.train()
        seen = []
        for seed in range(12):
            torch.manual_seed(seed)
            out = model(x)
            if torch.equal(out, base_out):
                seen.append("skipped")
            else:
                torch.testing.assert_close(out, adapted_out, rtol=1e-5, atol=1e-6)
                seen.append("applied")
        assert set(seen) == {"skipped", "applied"}
        model.eval()
        assert all(torch.equal(model(x), adapted_out) for _ in range(3))


def test_two_active_adapters_add_their_deltas():
    base, model, layer, x = adapted("conv1d", use_effective_conv2d=True)
    model.add_adapter("other", LoHaConfig(r=2, alpha=3, target_modules=["layer"], init_weights=False))
    model.set_adapter(["default", "other"])
    with torch.no_grad():
        expected = base(x) + base_op(
            layer, x, reference_delta(layer, "default") + reference_delta(layer, "other")
        )
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_low_precision_base_keeps_float32_adapter_and_its_own_output_dtype():
    base, _, _, x = adapted("linear")
    base = base.to(torch.bfloat16)
    model = peftkit.get_peft_model(
        copy.deepcopy(base), LoHaConfig(r=3, target_modules=["layer"], init_weights=False)
    )
    layer = model.base_model.model.layer
    assert all(p.dtype == torch.float32 for _, p in layer.adapter_parameters("default"))
    with torch.no_grad():
        x = x.bfloat16()
        out = model(x)
        assert out.dtype == torch.bfloat16
        # the adapter runs in float32 on the input cast up; the sum is rounded to bfloat16 once, as in PEFT
        expected = (base(x).float() + base_op(layer, x.float(), reference_delta(layer))).bfloat16()
        torch.testing.assert_close(out, expected, rtol=2**-8, atol=0)
