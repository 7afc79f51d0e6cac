"""The IA3 layer: PEFT's vector shapes, the scaling formulas, merging, and the exact unmerge of lost rows."""

from __future__ import annotations

import peftkit
import pytest
import torch
from peftkit import TargetModulesError
from peftkit.testing.models import tiny_llama, tiny_plain
from peftkit_ia3 import IA3Config, IA3Layer
from torch import nn
from transformers.pytorch_utils import Conv1D


def with_random_bias(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D starts its bias at zero, which would hide a bias left unscaled
    return layer


BASES = {
    "linear": lambda: with_random_bias(nn.Linear(6, 4)),
    "conv1d-transformers": lambda: with_random_bias(Conv1D(4, 6)),  # nf=out=4, nx=in=6, weight (in, out)
    "conv2d": lambda: with_random_bias(nn.Conv2d(6, 4, kernel_size=3, padding=1)),
    "conv2d-grouped": lambda: with_random_bias(nn.Conv2d(6, 4, kernel_size=3, padding=1, groups=2)),
    "conv3d": lambda: with_random_bias(nn.Conv3d(6, 4, kernel_size=2)),
}
INPUT_SHAPES = {
    "linear": (2, 3, 6),
    "conv1d-transformers": (2, 3, 6),
    "conv2d": (2, 6, 5, 5),
    "conv2d-grouped": (2, 6, 5, 5),
    "conv3d": (2, 6, 3, 3, 3),
}


def adapted(
    base: nn.Module, feedforward: bool, vector: torch.Tensor | None = None, name: str = "a"
) -> IA3Layer:
    """``base`` wrapped with one active IA3 adapter, as injection builds it, with the given vector values."""
    layer = IA3Layer(base)
    config = IA3Config(target_modules=["fc"], feedforward_modules=["fc"] if feedforward else [])
    layer.update_layer(name, config, "model.fc")
    layer.set_active([name])
    if vector is not None:
        with torch.no_grad():
            layer.ia3_l[name].copy_(vector.reshape(layer.ia3_l[name].shape))
    return layer


def channel_view(vector: torch.Tensor, kind: str) -> torch.Tensor:
    """The vector laid along the axis the base layer's features live on: last for linear, 1 for convolutions."""
    if kind in ("linear", "conv1d-transformers"):
        return vector
    return vector.reshape(1, -1, *([1] * (len(INPUT_SHAPES[kind]) - 2)))


@pytest.mark.parametrize(
    ("kind", "feedforward", "shape"),
    [
        ("linear", True, (1, 6)),
        ("linear", False, (4, 1)),
        ("conv1d-transformers", True, (1, 6)),
        ("conv1d-transformers", False, (4, 1)),
        ("conv2d", True, (1, 6, 1, 1)),
        ("conv2d", False, (1, 4, 1, 1)),
        ("conv3d", True, (1, 6, 1, 1, 1)),
        ("conv3d", False, (1, 4, 1, 1, 1)),
    ],
)
def test_vectors_have_peft_shapes_and_start_at_one(kind, feedforward, shape):
    vector = adapted(BASES[kind](), feedforward).ia3_l["a"]
    assert tuple(vector.shape) == shape
    assert torch.equal(vector, torch.ones(shape)) and vector.dtype == torch.float32


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("feedforward", [True, False], ids=["input", "output"])
def test_forward_scales_the_input_of_feedforward_layers_and_the_output_of_others(kind, feedforward):
    torch.manual_seed(0)
    base = BASES[kind]()
    channels = 6 if feedforward else 4
    vector = 1 + 0.5 * torch.randn(channels)
    layer = adapted(base, feedforward, vector)
    x = torch.randn(INPUT_SHAPES[kind])
    with torch.no_grad():
        expected = (
            base(x * channel_view(vector, kind)) if feedforward else base(x) * channel_view(vector, kind)
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(layer(x), base(x))


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("feedforward", [True, False], ids=["input", "output"])
def test_merged_forward_equals_unmerged_and_unmerge_gives_back_the_weights(kind, feedforward):
    torch.manual_seed(1)
    base = BASES[kind]()
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = adapted(base, feedforward, 1 + 0.5 * torch.randn(6 if feedforward else 4))
    x = torch.randn(INPUT_SHAPES[kind])
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["a"]
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-6)
        assert torch.equal(base.bias, bias) == feedforward  # only output scaling scales the bias
        layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), weight, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(base.bias.detach(), bias, rtol=1e-6, atol=0.0)
    assert layer.exact_copies == {}


def test_merge_scales_columns_for_input_scaling_and_rows_and_bias_for_output_scaling():
    torch.manual_seed(2)
    for feedforward in (True, False):
        base = nn.Linear(3, 2)
        weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
        vector = torch.tensor([2.0, 3.0, 5.0]) if feedforward else torch.tensor([2.0, 3.0])
        layer = adapted(base, feedforward, vector)
        layer.merge()
        if feedforward:
            assert torch.equal(base.weight, weight * vector[None, :]) and torch.equal(base.bias, bias)
        else:
            assert torch.equal(base.weight, weight * vector[:, None]) and torch.equal(
                base.bias, bias * vector
            )


@pytest.mark.parametrize("feedforward", [True, False], ids=["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_zero_and_tiny_scales_unmerge_exactly(feedforward, dtype):
    """Rows (output scaling) or columns (input scaling) whose scale wipes out the weight are given back
    bitwise from the copy the merge kept; the others are divided back, within the dtype's rounding."""
    torch.manual_seed(3)
    base = nn.Linear(5, 4).to(dtype)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    channels = 5 if feedforward else 4
    vector = 1 + 0.3 * torch.randn(channels)
    # 0 loses the weight outright; the tiny one makes every product underflow below the smallest normal
    # number of the dtype (float32: 1e-41 is itself subnormal; float16: 1e-6 · |w| < 6.1e-5)
    tiny = 1e-41 if dtype == torch.float32 else 1e-6
    lost = torch.tensor([True, False, True] + [False] * (channels - 3))
    vector[0], vector[2] = 0.0, tiny
    layer = adapted(base, feedforward, vector)
    x = torch.randn(3, 5, dtype=dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        zero_scaled_line = base.weight[:, 0] if feedforward else base.weight[0, :]
        assert torch.count_nonzero(zero_scaled_line) == 0  # the merge wiped it out: division cannot undo that
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-2, atol=1e-3)
        layer.unmerge()
    restored = base.weight.detach()
    rounding = 2 * torch.finfo(dtype).eps  # of the tensor's largest magnitude
    if feedforward:
        assert torch.equal(restored[:, lost], weight[:, lost])
        rest_now, rest_before = restored[:, ~lost], weight[:, ~lost]
        assert torch.equal(base.bias, bias)
    else:
        assert torch.equal(restored[lost, :], weight[lost, :])
        assert torch.equal(base.bias[lost], bias[lost])
        rest_now, rest_before = restored[~lost, :], weight[~lost, :]
        bias_rounding = rounding * bias.abs().max().item()
        torch.testing.assert_close(base.bias[~lost], bias[~lost], rtol=0.0, atol=bias_rounding)
    torch.testing.assert_close(rest_now, rest_before, rtol=0.0, atol=rounding * weight.abs().max().item())
    assert layer.exact_copies == {} and layer.merged_adapters == []


def test_ordinary_scales_keep_no_copy_while_merged():
    base = nn.Linear(4, 3)
    layer = adapted(base, False, torch.tensor([0.5, 1.0, 2.0]))
    layer.merge()
    lost, kept = layer.exact_copies["a"]["weight"]
    assert not lost.any() and kept.numel() == 0


def test_several_adapters_multiply_and_each_scales_its_own_side():
    torch.manual_seed(4)
    base = nn.Linear(6, 4)
    layer = adapted(base, True, 1 + 0.3 * torch.randn(6), name="in")
    layer.update_layer("out", IA3Config(target_modules=["fc"], feedforward_modules=[]), "model.fc")
    with torch.no_grad():
        layer.ia3_l["out"].copy_(1 + 0.3 * torch.randn(4, 1))
    layer.set_active(["in", "out"])
    weight = base.weight.detach().clone()
    x = torch.randn(2, 6)
    l_in, l_out = layer.ia3_l["in"].detach().flatten(), layer.ia3_l["out"].detach().flatten()
    with torch.no_grad():
        expected = base(x * l_in) * l_out
        torch.testing.assert_close(layer(x), expected)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight.detach(), weight, rtol=1e-6, atol=0.0)


def test_adapters_of_one_kind_multiply_their_vectors_as_peft_does():
    base = nn.Linear(2, 2, bias=False)
    layer = adapted(base, False, torch.tensor([2.0, 3.0]), name="a")
    layer.update_layer("b", IA3Config(target_modules=["fc"], feedforward_modules=[]), "model.fc")
    with torch.no_grad():
        layer.ia3_l["b"].copy_(torch.tensor([[5.0], [7.0]]))
        base.weight.copy_(torch.eye(2))
    layer.set_active(["a", "b"])
    with torch.no_grad():
        assert torch.equal(layer(torch.ones(1, 2)), torch.tensor([[10.0, 21.0]]))


def test_feedforward_membership_follows_peft_suffix_and_regex_rules():
    base = nn.Linear(4, 4)
    layer = IA3Layer(base)
    # a list name matches the end of the path, as PEFT checks it (without a dot boundary)
    layer.update_layer(
        "list", IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "m.down_proj"
    )
    layer.update_layer(
        "regex", IA3Config(target_modules=".*proj", feedforward_modules=r"m\.down_proj"), "m.down_proj"
    )
    layer.update_layer(
        "partial", IA3Config(target_modules=".*proj", feedforward_modules="down"), "m.down_proj"
    )
    assert layer.is_feedforward == {"list": True, "regex": True, "partial": False}
    assert tuple(layer.ia3_l["partial"].shape) == (4, 1)


def test_init_ia3_weights_false_gives_random_vectors_that_change_outputs():
    model = tiny_llama()
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    peft_model = peftkit.get_peft_model(model, IA3Config(init_ia3_weights=False))
    vectors = [p for name, p in peft_model.named_parameters() if "ia3_l" in name]
    assert vectors and not any(torch.equal(v, torch.ones_like(v)) for v in vectors)
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, reference)


def test_half_precision_model_keeps_float32_vectors_and_its_own_output_dtype():
    model = tiny_llama().to(torch.bfloat16)
    peft_model = peftkit.get_peft_model(model, IA3Config(init_ia3_weights=False))
    assert {p.dtype for name, p in peft_model.named_parameters() if "ia3_l" in name} == {torch.float32}
    logits = peft_model(input_ids=torch.randint(1, 128, (1, 5))).logits
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    assert all(p.grad is not None for name, p in peft_model.named_parameters() if "ia3_l" in name)


def test_the_wrapped_weight_and_bias_stay_readable_as_model_code_expects():
    base = nn.Linear(3, 2)
    layer = adapted(base, True)
    assert layer.weight is base.weight and layer.bias is base.bias


@pytest.mark.parametrize(("target", "kind"), [("embed", "embedding"), ("conv", "conv1d")])
def test_layers_peft_cannot_adapt_with_ia3_are_refused_by_name(target, kind):
    with pytest.raises(TargetModulesError) as info:
        peftkit.get_peft_model(tiny_plain(), IA3Config(target_modules=[target], feedforward_modules=[]))
    assert f"module '{target}' matched target_modules, but ia3 cannot adapt a {kind} layer" in str(info.value)
    assert "it adapts: linear, conv2d, conv3d" in str(info.value)


def test_conv2d_model_merges_and_round_trips_through_files(tmp_path):
    class TinyConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
            self.head = nn.Linear(8, 2)

        def forward(self, pixels):
            h = torch.relu(self.conv2(torch.relu(self.conv1(pixels))))
            return self.head(h.mean(dim=(2, 3)))

    def build():
        torch.manual_seed(5)
        return TinyConvNet().eval()

    base = build()
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    config = IA3Config(target_modules=["conv1", "conv2", "head"], feedforward_modules=["conv2"])
    model = peftkit.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    pixels = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(pixels)
        assert not torch.allclose(expected, build()(pixels))
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(peftkit.PeftModel.from_pretrained(build(), tmp_path)(pixels), expected)
        model.merge_adapter()
        torch.testing.assert_close(model(pixels), expected, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
    for key, value in model.base_model.model.state_dict().items():
        if "ia3_l" not in key:
            torch.testing.assert_close(value, pristine[key.replace(".base_layer", "")], rtol=1e-6, atol=0.0)
