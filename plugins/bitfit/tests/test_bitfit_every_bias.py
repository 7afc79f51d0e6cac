"""BitFitConfig() trains every bias: norm layers with a bias, tied biases once, and a warning naming any
bias BitFit cannot offset (rather than an offset that silently does nothing)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from peftkit import get_peft_model
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_plain
from peftkit_bitfit import BitFitChannelNorm, BitFitConfig, BitFitLayer, BitFitLayerNorm
from torch import nn
from transformers import BertConfig, BertForMaskedLM


def bias_values(model: nn.Module) -> int:
    """The manual recipe's count: parameters whose name ends with "bias", each tensor once."""
    return sum(p.numel() for name, p in model.named_parameters() if name.endswith("bias"))


def bitfit_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "BitFit" in str(w.message)]


class ConvNormNet(nn.Module):
    """A convolution with every norm kind that has a channel bias, and a BatchNorm1d on (batch, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.batch_norm = nn.BatchNorm2d(8)
        self.group_norm = nn.GroupNorm(2, 8)
        self.instance_norm = nn.InstanceNorm2d(8, affine=True)
        self.fc = nn.Linear(8, 6)
        self.batch_norm_1d = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.instance_norm(self.group_norm(self.batch_norm(self.conv(x))))
        return self.batch_norm_1d(self.fc(h.mean((2, 3))))


def conv_norm_net() -> ConvNormNet:
    torch.manual_seed(0)
    net = ConvNormNet()
    with torch.no_grad():  # running statistics and affine tensors away from their defaults
        for module in net.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1, 1)
    return net.eval()


def tiny_llama_with_biases():
    return tiny_llama(attention_bias=True, mlp_bias=True)


def tiny_bert_mlm():
    """BERT with a masked-LM head, whose decoder's bias is the same tensor as ``cls.predictions.bias``."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return BertForMaskedLM(config).eval()


@pytest.mark.parametrize(
    "build", [tiny_bert, tiny_gpt2, tiny_plain, tiny_llama_with_biases, tiny_bert_mlm, conv_norm_net]
)
def test_the_trained_bias_count_is_the_models_bias_count_and_nothing_is_left_out(build):
    base = build()
    expected = bias_values(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, BitFitConfig())
    assert bitfit_warnings(caught) == []
    assert model.get_nb_trainable_parameters()[0] == expected


# the core warns that merging into the decoder touches the embedding tied to its weight; BitFit writes
# only the bias, so the warning does not apply here
@pytest.mark.filterwarnings("ignore:merging into 'cls.predictions.decoder':UserWarning")
def test_a_tied_bias_gets_one_offset_and_merging_adds_it_once():
    base = tiny_bert_mlm()
    decoder = base.cls.predictions.decoder
    assert decoder.bias is base.cls.predictions.bias  # the tie this test is about
    original = decoder.bias.detach().clone()
    model = randomize_trainable(get_peft_model(base, BitFitConfig()))
    offset = model.base_model.model.cls.predictions.decoder.bitfit_bias["default"].detach().clone()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        assert torch.equal(base.cls.predictions.bias, original + offset)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_each_norm_adds_its_bias_offset_along_the_channels():
    """Against torch's functional norms called with the shifted bias (and the base's running statistics)."""
    model = randomize_trainable(get_peft_model(conv_norm_net(), BitFitConfig()))
    net = model.base_model.model
    assert all(
        isinstance(getattr(net, name), BitFitChannelNorm)
        for name in ("batch_norm", "group_norm", "instance_norm", "batch_norm_1d")
    )
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        norm = net.batch_norm.base_layer
        bias = norm.bias + net.batch_norm.bitfit_bias["default"]
        expected = F.batch_norm(
            x, norm.running_mean, norm.running_var, norm.weight, bias, False, 0.0, norm.eps
        )
        torch.testing.assert_close(net.batch_norm(x), expected, atol=1e-6, rtol=1e-5)
        norm = net.group_norm.base_layer
        bias = norm.bias + net.group_norm.bitfit_bias["default"]
        expected = F.group_norm(x, norm.num_groups, norm.weight, bias, norm.eps)
        torch.testing.assert_close(net.group_norm(x), expected, atol=1e-6, rtol=1e-5)
        norm = net.instance_norm.base_layer
        bias = norm.bias + net.instance_norm.bitfit_bias["default"]
        expected = F.instance_norm(x, weight=norm.weight, bias=bias, eps=norm.eps)
        torch.testing.assert_close(net.instance_norm(x), expected, atol=1e-6, rtol=1e-5)
        # an instance norm also takes an unbatched input, channels first
        torch.testing.assert_close(net.instance_norm(x[0]), expected[0], atol=1e-6, rtol=1e-5)
        norm = net.batch_norm_1d.base_layer
        bias = norm.bias + net.batch_norm_1d.bitfit_bias["default"]
        features = torch.randn(4, 6)
        expected = F.batch_norm(
            features, norm.running_mean, norm.running_var, norm.weight, bias, False, 0.0, norm.eps
        )
        torch.testing.assert_close(net.batch_norm_1d(features), expected, atol=1e-6, rtol=1e-5)


def test_norms_merge_unmerge_disable_and_keep_their_running_statistics():
    base = conv_norm_net()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        reference = base(x)
    before = copy.deepcopy(base.state_dict())
    model = randomize_trainable(get_peft_model(base, BitFitConfig()))
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, reference)
        with model.disable_adapter():
            assert torch.equal(model(x), reference)
        model.merge_adapter()
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        assert not torch.equal(base.group_norm.base_layer.bias, before["group_norm.bias"])
        model.unmerge_adapter()
        for name, value in base.batch_norm.base_layer.state_dict().items():
            torch.testing.assert_close(value, before[f"batch_norm.{name}"], atol=1e-6, rtol=0)
    # in training mode the base BatchNorm updates its running statistics exactly as it would alone
    alone = copy.deepcopy(conv_norm_net().batch_norm).train()
    model.train()
    h = torch.randn(4, 8, 5, 5)
    model.base_model.model.batch_norm(h)
    alone(h)
    assert torch.equal(base.batch_norm.base_layer.running_mean, alone.running_mean)
    assert torch.equal(base.batch_norm.base_layer.running_var, alone.running_var)


class WithMultiheadAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_biases_bitfit_cannot_offset_are_named_in_a_warning_not_silently_dropped():
    """nn.MultiheadAttention computes with out_proj's tensors without calling out_proj: an offset there
    would never apply, so BitFit leaves it alone and says so."""
    torch.manual_seed(0)
    base = WithMultiheadAttention().eval()
    with pytest.warns(UserWarning) as caught:
        model = get_peft_model(base, BitFitConfig())
    assert bitfit_warnings(caught) == [
        "BitFitConfig(target_modules=None) trains no offset for 2 biases (32 values) in modules BitFit cannot "
        "offset: 'attn.in_proj_bias' (MultiheadAttention), 'attn.out_proj.bias' "
        "(NonDynamicallyQuantizableLinear). BitFit offsets the biases of Linear, Conv1d/2d/3d and "
        "transformers' Conv1D layers, LayerNorm, GroupNorm, BatchNorm and InstanceNorm; leave those modules "
        "out with exclude_modules, or train them in full with modules_to_save"
    ]
    assert [path for path, _ in model.adapter_layers()] == ["fc"]
    assert model.get_nb_trainable_parameters()[0] == bias_values(WithMultiheadAttention()) - 3 * 8 - 8
    with pytest.raises(ValueError, match=r"matched 'attn.out_proj', but nn.MultiheadAttention computes with"):
        get_peft_model(WithMultiheadAttention(), BitFitConfig(target_modules=["out_proj"]))
    # what the warning offers: leave the module out, or train it in full
    for config in (
        BitFitConfig(exclude_modules=["attn", "out_proj"]),
        BitFitConfig(modules_to_save=["attn"]),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            get_peft_model(WithMultiheadAttention(), config)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A LayerNorm over the channels of (batch, channels, length), as vision models write their own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def test_a_layer_norm_with_its_own_forward_is_not_guessed_at():
    base = nn.Sequential(nn.Conv1d(4, 4, 1), ChannelsFirstLayerNorm(4))
    with pytest.warns(
        UserWarning, match=r"no offset for 1 biases \(4 values\) .*'1.bias' \(ChannelsFirstLayerNorm\)"
    ):
        model = get_peft_model(base, BitFitConfig())
    assert [path for path, _ in model.adapter_layers()] == ["0"]
    with pytest.raises(
        ValueError, match="matched '1', but BitFit does not adapt ChannelsFirstLayerNorm layers"
    ):
        get_peft_model(
            nn.Sequential(nn.Conv1d(4, 4, 1), ChannelsFirstLayerNorm(4)), BitFitConfig(target_modules=["1"])
        )


def test_a_model_whose_biases_are_all_out_of_reach_names_them():
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(nn.Sequential(nn.MultiheadAttention(8, 2)), BitFitConfig())
    assert str(info.value) == (
        "BitFitConfig(target_modules=None) found nothing to train in Sequential: its biases (outside "
        "exclude_modules and modules_to_save) are all in modules BitFit cannot offset: '0.in_proj_bias' "
        "(MultiheadAttention), '0.out_proj.bias' (NonDynamicallyQuantizableLinear); it offsets the biases "
        "of Linear, Conv1d/2d/3d and transformers' Conv1D layers, LayerNorm, GroupNorm, BatchNorm and "
        "InstanceNorm"
    )


def test_adapters_with_and_without_layer_norm_weights_share_a_layer_norm():
    model = randomize_trainable(get_peft_model(tiny_plain(), BitFitConfig(target_modules=["norm"])))
    model.add_adapter("gamma", BitFitConfig(target_modules=["norm"], train_layer_norm=True))
    generator = torch.Generator().manual_seed(3)
    layer = model.base_model.model.norm
    with torch.no_grad():
        for _, p in layer.adapter_parameters("gamma"):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    norm, x = layer.base_layer, torch.randn(2, 5, 32)
    assert isinstance(layer, BitFitLayerNorm) and set(layer.bitfit_weight) == {"gamma"}
    with torch.no_grad():
        expected = F.layer_norm(x, (32,), norm.weight, norm.bias + layer.bitfit_bias["default"], norm.eps)
        assert torch.equal(layer(x), expected)
        model.set_adapter("gamma")
        weight = norm.weight + layer.bitfit_weight["gamma"]
        expected = F.layer_norm(x, (32,), weight, norm.bias + layer.bitfit_bias["gamma"], norm.eps)
        assert torch.equal(layer(x), expected)


def test_each_row_of_a_mixed_batch_gets_its_own_adapters_layer_norm_offsets():
    """LayerNorms recompute the normalisation: each row with its own adapter's γ and β, base rows without."""
    model = get_peft_model(tiny_bert(), BitFitConfig())
    model.add_adapter("other", BitFitConfig(train_layer_norm=True))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".bitfit_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            alone["__base__"] = model(input_ids=ids).logits
        rows = ["other", "__base__", "default"]
        mixed = model(input_ids=ids, adapter_names=rows).logits
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(alone["other"], alone["default"])


def test_merge_and_unload_leaves_plain_norms_with_shifted_biases():
    base = conv_norm_net()
    original = base.group_norm.bias.detach().clone()
    model = randomize_trainable(get_peft_model(base, BitFitConfig()))
    offset = model.base_model.model.group_norm.bitfit_bias["default"].detach().clone()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (BitFitLayer, BitFitChannelNorm)) for m in merged.modules())
    assert type(merged.group_norm) is nn.GroupNorm
    assert torch.equal(merged.group_norm.bias, original + offset)
