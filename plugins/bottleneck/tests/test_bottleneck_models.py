"""Bottleneck adapters on real layouts: where they go, what they compute, training, saving and loading."""

from __future__ import annotations

import pytest
import torch
from peftkit import MergeNotSupportedError, PeftModel, TargetModulesError, get_peft_model
from peftkit.serialization import read_tensors
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_bottleneck import BottleneckConfig, BottleneckLayer
from torch import nn
from torch.nn import functional as F

STYLES = ("houlsby", "pfeiffer", "parallel")
IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def bert():
    return tiny_bert(hidden_size=32)


def llama(hidden_size=32):
    return tiny_llama(hidden_size=hidden_size)


def adapted_paths(model):
    return [path for path, layer in model.adapter_layers() if isinstance(layer, BottleneckLayer)]


def logits(model, ids=IDS, **extra):
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


def loss(model, build):
    if build is bert:
        return model(input_ids=IDS, labels=torch.tensor([0, 1])).loss
    return model(input_ids=IDS, labels=IDS).loss


# --- where the adapters go --------------------------------------------------------------------------
EXPECTED_POINTS = {
    (bert, "houlsby"): [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
    ],
    # pfeiffer reads the normalised residual sum (AdapterHub's original_ln_before=True): around BERT's
    # LayerNorm after the feed-forward block, after a whole decoder layer
    (bert, "pfeiffer"): ["bert.encoder.layer.0.output.LayerNorm", "bert.encoder.layer.1.output.LayerNorm"],
    (bert, "parallel"): ["bert.encoder.layer.0.output", "bert.encoder.layer.1.output"],
    (llama, "houlsby"): [
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
        "model.layers.1.self_attn",
        "model.layers.1.mlp",
    ],
    (llama, "pfeiffer"): ["model.layers.0", "model.layers.1"],
    (llama, "parallel"): ["model.layers.0.mlp", "model.layers.1.mlp"],
    (tiny_gpt2, "houlsby"): [
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
    ],
    (tiny_gpt2, "pfeiffer"): ["transformer.h.0", "transformer.h.1"],
    (tiny_gpt2, "parallel"): ["transformer.h.0.mlp", "transformer.h.1.mlp"],
}


@pytest.mark.parametrize(("build", "style"), list(EXPECTED_POINTS), ids=lambda v: getattr(v, "__name__", v))
def test_insertion_points_are_found_from_the_layout(build, style):
    model = get_peft_model(build(), BottleneckConfig(style=style))
    assert adapted_paths(model) == EXPECTED_POINTS[build, style]


def test_t5_adapts_self_attention_and_dense_relu_dense_and_cross_attention_when_asked():
    def blocks(config):
        paths = adapted_paths(get_peft_model(tiny_t5(), config))
        return sorted({path.split(".", 1)[0] + ":" + path.rsplit(".", 1)[-1] for path in paths}), len(paths)

    # 2 encoder and 2 decoder blocks
    assert blocks(BottleneckConfig(style="pfeiffer", original_ln_before=False)) == (
        ["decoder:DenseReluDense", "encoder:DenseReluDense"],
        4,
    )
    # the feed-forward sub-layers, which add their own residual: layer.1 in the encoder, layer.2 in the decoder
    assert blocks(BottleneckConfig(style="pfeiffer")) == (["decoder:2", "encoder:1"], 4)
    assert blocks(BottleneckConfig(style="houlsby")) == (
        [
            "decoder:DenseReluDense",
            "decoder:SelfAttention",
            "encoder:DenseReluDense",
            "encoder:SelfAttention",
        ],
        8,
    )
    assert blocks(BottleneckConfig(style="houlsby", cross_adapter=True)) == (
        [
            "decoder:DenseReluDense",
            "decoder:EncDecAttention",
            "decoder:SelfAttention",
            "encoder:DenseReluDense",
            "encoder:SelfAttention",
        ],
        10,
    )


@pytest.mark.parametrize("style", STYLES)
def test_t5_and_gpt2_adapters_are_identity_at_init_and_act_once_trained(style):
    for build, extra in ((tiny_t5, {"decoder_input_ids": IDS}), (tiny_gpt2, {})):
        base = build()
        reference = logits(base, **extra)
        model = get_peft_model(base, BottleneckConfig(style=style, cross_adapter=build is tiny_t5))
        assert torch.equal(logits(model, **extra), reference)
        randomize_trainable(model)
        assert not torch.allclose(logits(model, **extra), reference, atol=1e-4)


def test_sizes_follow_the_hidden_size_and_reduction_factor():
    model = get_peft_model(tiny_t5(d_model=32), BottleneckConfig(style="parallel", reduction_factor=4))
    layer = model.get_submodule("base_model.model.encoder.block.0.layer.1.DenseReluDense")
    assert tuple(layer.adapter_down["default"].weight.shape) == (8, 32)
    assert tuple(layer.adapter_up["default"].weight.shape) == (32, 8)


# --- what they compute -------------------------------------------------------------------------------
def _bottleneck(layer, h, act, scaling):
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    return scaling * F.linear(act(F.linear(h, down.weight, down.bias)), up.weight, up.bias)


def test_sequential_adapter_adds_its_output_after_the_llama_mlp():
    config = BottleneckConfig(style="pfeiffer", non_linearity="tanh", scaling=0.5, original_ln_before=False)
    model = get_peft_model(llama(), config)
    randomize_trainable(model)
    layer = model.get_submodule("base_model.model.model.layers.0.mlp")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + _bottleneck(layer, h, torch.tanh, 0.5)
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_parallel_adapter_reading_the_block_input_reads_the_llama_mlp_input():
    model = get_peft_model(llama(), BottleneckConfig(style="parallel", parallel_input="block_input"))
    randomize_trainable(model)
    layer = model.get_submodule("base_model.model.model.layers.0.mlp")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + _bottleneck(layer, x, torch.relu, 4.0)
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_parallel_adapter_on_bert_adds_before_the_residual_layer_norm():
    model = get_peft_model(bert(), BottleneckConfig(style="parallel", scaling=2.0))
    randomize_trainable(model)
    layer = model.get_submodule("base_model.model.bert.encoder.layer.0.output")
    output = layer.base_layer  # BertOutput: LayerNorm(dropout(dense(h)) + r)
    h, r = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = output.LayerNorm(output.dense(h) + _bottleneck(layer, r, torch.relu, 2.0) + r)
        assert torch.allclose(layer(h, r), expected, atol=1e-5)
        assert torch.allclose(layer(h, input_tensor=r), expected, atol=1e-5)


# --- identity, training, saving and loading on BERT and Llama ----------------------------------------
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("build", [bert, llama])
def test_identity_train_save_load(build, style, tmp_path):
    base = build()
    reference = logits(base)
    config = BottleneckConfig(style=style, task_type="SEQ_CLS" if build is bert else "CAUSAL_LM")
    model = get_peft_model(base, config)
    assert torch.equal(logits(model), reference)

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        value = loss(model, build)
        losses.append(value.item())
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert losses[-1] < losses[0]
    trained = logits(model)
    assert not torch.allclose(trained, reference, atol=1e-4)

    model.save_pretrained(tmp_path)
    keys = sorted(read_tensors(tmp_path))
    first = EXPECTED_POINTS[build, style][0]
    for tensor in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"):
        assert f"base_model.model.{first}.{tensor}" in keys
    adapter_keys = [key for key in keys if ".adapter_" in key]
    assert len(adapter_keys) == 4 * len(EXPECTED_POINTS[build, style])
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert loaded.peft_config["default"].style == style
    assert torch.equal(logits(loaded), trained)


def test_several_adapters_of_mixed_styles_on_one_llama_switch_and_add_up():
    model = get_peft_model(llama(), BottleneckConfig(style="houlsby"))
    model.add_adapter("par", BottleneckConfig(style="parallel"))
    model.set_adapter(["default", "par"])  # both trainable, so both get random weights
    randomize_trainable(model)
    outs = {}
    for name in ("default", "par"):
        model.set_adapter(name)
        outs[name] = logits(model)
    assert not torch.equal(outs["default"], outs["par"])
    mlp = model.get_submodule("base_model.model.model.layers.0.mlp")
    assert mlp.placement == {"default": "after", "par": "beside_stream"}
    model.set_adapter(["default", "par"])
    both = logits(model)
    assert not torch.equal(both, outs["default"]) and not torch.equal(both, outs["par"])


def test_bert_refuses_to_nest_parallel_and_sequential_adapters():
    model = get_peft_model(bert(), BottleneckConfig(style="parallel"))
    with pytest.raises(
        TargetModulesError, match="keep one model's bottleneck adapters all parallel or all sequential"
    ):
        model.add_adapter("seq", BottleneckConfig(style="pfeiffer"))
    model = get_peft_model(bert(), BottleneckConfig(style="pfeiffer"))
    with pytest.raises(TargetModulesError, match=r"'bert\.encoder\.layer\.0\.output' would nest"):
        model.add_adapter("par", BottleneckConfig(style="parallel"))
    assert list(model.peft_config) == ["default"]
    model.add_adapter("par2", BottleneckConfig(style="houlsby"))  # sequential ones share the dense layers


# --- merging ------------------------------------------------------------------------------------------
def test_merging_is_refused_with_a_clear_error():
    model = get_peft_model(llama(), BottleneckConfig())
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(MergeNotSupportedError) as info:
            merge()
        assert str(info.value) == (
            "adapter 'default' is a bottleneck adapter, and bottleneck cannot be merged into the base weights; "
            "keep the PeftModel for inference, or use a mergeable method such as LoRA"
        )


# --- models without a known layout --------------------------------------------------------------------
class Block(nn.Module):
    """A residual block whose 'attention' returns a tuple, as transformers' attention modules do."""

    def __init__(self, d):
        super().__init__()
        self.mix = TupleLinear(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h):
        mixed, aux = self.mix(h)
        h = h + mixed
        return h + self.ff(h), aux


class TupleLinear(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, h):
        return self.proj(h), h.sum()


class Plain(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])

    def forward(self, h):
        for block in self.blocks:
            h, _ = block(h)
        return h


def test_an_unknown_model_without_names_is_a_clear_error():
    torch.manual_seed(0)
    with pytest.raises(TargetModulesError) as info:
        get_peft_model(Plain(), BottleneckConfig(style="houlsby"))
    assert str(info.value).startswith(
        "peftkit-bottleneck does not know where the attention and feed-forward blocks of Plain (model_type None) "
        "are; set BottleneckConfig.attention_modules and feedforward_modules for style='houlsby'"
    )
    with pytest.raises(
        TargetModulesError, match=r"set BottleneckConfig\.feedforward_modules for style='parallel'"
    ):
        get_peft_model(Plain(), BottleneckConfig(style="parallel"))


def test_explicit_names_on_a_plain_module_tuple_outputs_and_sizes_from_inner_layers():
    torch.manual_seed(0)
    base = Plain()
    h = torch.randn(3, 16)
    with torch.no_grad():
        reference = base(h)
    model = get_peft_model(
        base,
        BottleneckConfig(
            style="houlsby", attention_modules=["mix"], feedforward_modules=["ff"], reduction_factor=4
        ),
    )
    assert adapted_paths(model) == ["blocks.0.mix", "blocks.0.ff", "blocks.1.mix", "blocks.1.ff"]
    ff = model.get_submodule("base_model.model.blocks.0.ff")
    assert tuple(ff.adapter_down["default"].weight.shape) == (4, 16)  # 16 from the Sequential's last Linear
    with torch.no_grad():
        assert torch.equal(model(h), reference)
    randomize_trainable(model)
    mix = model.get_submodule("base_model.model.blocks.0.mix")
    with torch.no_grad():
        out, aux = mix(h)
        projected = mix.base_layer.proj(h)
        assert torch.allclose(out, projected + _bottleneck(mix, projected, F.silu, 1.0), atol=1e-6)
        assert torch.equal(aux, h.sum())  # the rest of the tuple passes through
        assert not torch.allclose(model(h), reference, atol=1e-4)


def test_parallel_on_a_named_linear_reads_its_input_size():
    config = BottleneckConfig(style="parallel", parallel_input="block_input", feedforward_modules=r".*ff\.2")
    model = get_peft_model(Plain(), config)
    layer = model.get_submodule("base_model.model.blocks.0.ff.2")
    assert tuple(layer.adapter_down["default"].weight.shape) == (16, 32)  # reads 32, reduction_factor 2
    assert tuple(layer.adapter_up["default"].weight.shape) == (16, 16)


def test_names_that_match_nothing_and_unknown_cross_attention_are_clear_errors():
    with pytest.raises(TargetModulesError) as info:
        get_peft_model(Plain(), BottleneckConfig(feedforward_modules=["mlp"]))
    assert str(info.value).startswith(
        "BottleneckConfig.feedforward_modules=['mlp'] matched no module of Plain"
    )
    with pytest.raises(
        TargetModulesError, match="cross_adapter=True, but peftkit-bottleneck knows no cross-attention"
    ):
        get_peft_model(llama(), BottleneckConfig(cross_adapter=True))


def test_a_reduction_factor_larger_than_the_hidden_size_is_refused_before_wrapping():
    base = Plain()
    with pytest.raises(TargetModulesError) as info:
        get_peft_model(base, BottleneckConfig(feedforward_modules=["ff"], reduction_factor=17))
    assert str(info.value) == (
        "BottleneckConfig.reduction_factor=17 leaves no bottleneck feature for 'blocks.0.ff', whose adapter "
        "reads 16 features; use a reduction_factor of at most 16"
    )
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())


# --- initialisations -----------------------------------------------------------------------------------
def test_adapterhub_initialisations():
    def up_weight(init):
        model = get_peft_model(llama(hidden_size=64), BottleneckConfig(init_weights=init, reduction_factor=2))
        return model.get_submodule("base_model.model.model.layers.0").adapter_up["default"]

    assert torch.count_nonzero(up_weight("mam_adapter").weight) == 0
    bert_up = up_weight("bert")
    assert 0.01 < bert_up.weight.std().item() < 0.03 and torch.count_nonzero(bert_up.bias) == 0
    houlsby_up = up_weight("houlsby").weight
    assert houlsby_up.abs().max().item() <= 0.02 and torch.count_nonzero(houlsby_up) > 0


def _tiny(config_name, model_name, **settings):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        **settings,
    )
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize(
    ("build", "houlsby_points"),
    [
        (
            lambda: _tiny("RobertaConfig", "RobertaForMaskedLM", max_position_embeddings=64),
            ["roberta.encoder.layer.0.attention.output.dense", "roberta.encoder.layer.0.output.dense"],
        ),
        (
            lambda: _tiny("MistralConfig", "MistralForCausalLM", num_key_value_heads=2),
            ["model.layers.0.self_attn", "model.layers.0.mlp"],
        ),
        (
            lambda: _tiny("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
            ["model.layers.0.self_attn", "model.layers.0.mlp"],
        ),
    ],
    ids=["roberta", "mistral", "qwen2"],
)
def test_roberta_mistral_and_qwen2_share_the_bert_and_llama_layouts(build, houlsby_points):
    base = build()
    reference = logits(base)
    model = get_peft_model(base, BottleneckConfig(style="houlsby"))
    assert adapted_paths(model)[:2] == houlsby_points and len(adapted_paths(model)) == 4
    assert torch.equal(logits(model), reference)
    randomize_trainable(model)
    assert not torch.allclose(logits(model), reference, atol=1e-4)


def test_pfeiffer_wraps_qwen2s_decoder_layers_which_keep_their_attributes():
    # transformers 4.57's Qwen2Model reads decoder_layer.attention_type (its forward runs in the transformers
    # 4 stage): the wrapper passes attribute reads through to the layer
    base = _tiny("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2)
    reference = logits(base)
    model = get_peft_model(base, BottleneckConfig(style="pfeiffer"))
    layer = model.get_submodule("base_model.model.model.layers.0")
    assert isinstance(layer, BottleneckLayer)
    assert layer.hidden_size == 32 and not hasattr(layer, "no_such_attribute")
    assert torch.equal(logits(model), reference)
    randomize_trainable(model)
    assert not torch.allclose(logits(model), reference, atol=1e-4)
