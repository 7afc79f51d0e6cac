"""What a parallel adapter reads (BottleneckConfig.parallel_input): on pre-norm models the residual stream r
before the feed-forward block's norm (AdapterHub's ParBnConfig, the default), or the block's input LN(r).

The stream is taken by a forward pre-hook on the norm; these tests check the formula, that the hook lives
exactly as long as an adapter needs it, and the paths users take (compile, autocast, checkpointing, old
configs). Equality with AdapterHub itself: test_adapterhub_equality.py (transformers 4 stage).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peftkit import ConfigError, PeftModel, TargetModulesError, get_peft_model
from peftkit.testing.models import randomize_trainable, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_bottleneck import BottleneckConfig, BottleneckLayer
from torch import nn
from torch.nn import functional as F

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
PARALLEL = BottleneckConfig(style="parallel", reduction_factor=4)


def logits(model, **extra):
    with torch.no_grad():
        return model(input_ids=IDS, **extra).logits


def adapted(base, config=PARALLEL, scale=0.3):
    model = get_peft_model(base, config)
    randomize_trainable(model, scale=scale)
    return model


def bottleneck(layer, h, name="default"):
    """relu and scaling 4.0: the parallel style's defaults."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return 4.0 * F.linear(torch.relu(F.linear(h, down.weight, down.bias)), up.weight, up.bias)


def stream_hooks(model):
    return sum(len(module._forward_pre_hooks) for module in model.modules())


def test_the_default_is_the_residual_stream_and_other_styles_leave_it_unset():
    assert BottleneckConfig(style="parallel").parallel_input == "residual"
    assert BottleneckConfig(style="pfeiffer").parallel_input is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"style": "parallel", "parallel_input": "input"},
            "BottleneckConfig.parallel_input must be one of 'residual', 'block_input', got 'input'",
        ),
        (
            {"style": "houlsby", "parallel_input": "residual"},
            "BottleneckConfig.parallel_input must be None with style='houlsby'",
        ),
        (
            {"style": "parallel", "original_ln_before": True},
            "BottleneckConfig.original_ln_before must be False or None with style='parallel'",
        ),
    ],
)
def test_bad_parallel_inputs_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        BottleneckConfig(**fields)


def test_on_gpt2_the_adapter_reads_the_residual_stream_and_adds_beside_the_mlp():
    model = adapted(tiny_gpt2())
    block = model.get_submodule("base_model.model.transformer.h.0")
    mlp = block.mlp
    assert mlp.placement == {"default": "beside_stream"}
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        r = x + block.attn(block.ln_1(x))[0]
        expected = r + mlp.base_layer(block.ln_2(r)) + bottleneck(mlp, r)
        out = block(x)
        assert torch.allclose(out[0] if isinstance(out, tuple) else out, expected, atol=1e-5)


def test_reading_the_block_input_instead_reads_the_normed_stream():
    model = adapted(
        tiny_gpt2(), BottleneckConfig(style="parallel", reduction_factor=4, parallel_input="block_input")
    )
    block = model.get_submodule("base_model.model.transformer.h.0")
    assert block.mlp.placement == {"default": "beside"}
    assert stream_hooks(model) == 0
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        r = x + block.attn(block.ln_1(x))[0]
        normed = block.ln_2(r)
        expected = r + block.mlp.base_layer(normed) + bottleneck(block.mlp, normed)
        out = block(x)
        assert torch.allclose(out[0] if isinstance(out, tuple) else out, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "norm"),
    [(tiny_llama, "post_attention_layernorm"), (tiny_gpt2, "ln_2"), (tiny_t5, "layer_norm")],
    ids=["llama", "gpt2", "t5"],
)
def test_the_hook_sits_on_the_norm_beside_each_mlp(build, norm):
    model = adapted(build())
    layers = [layer for _, layer in model.adapter_layers() if isinstance(layer, BottleneckLayer)]
    assert layers and all(layer.placement["default"] == "beside_stream" for layer in layers)
    for path, layer in model.adapter_layers():
        parent = model.get_submodule(path.rpartition(".")[0])
        assert layer._stream_norm is getattr(parent, norm)
        assert len(layer._stream_norm._forward_pre_hooks) == 1


def test_the_hook_goes_with_the_last_stream_adapter_and_with_unload():
    model = adapted(tiny_llama())
    model.add_adapter("other", PARALLEL)
    model.add_adapter("seq", BottleneckConfig(style="houlsby"))
    layers = model.base_model.model.config.num_hidden_layers
    assert stream_hooks(model) == layers  # one per norm, however many adapters read it
    model.delete_adapter("default")
    assert stream_hooks(model) == layers
    model.delete_adapter("other")
    assert stream_hooks(model) == 0  # the houlsby adapter on the same MLP reads no stream
    model.add_adapter("again", PARALLEL)
    assert stream_hooks(model) == layers
    base = model.unload()
    assert stream_hooks(base) == 0
    assert not any(isinstance(module, BottleneckLayer) for module in base.modules())


def test_a_deep_copy_reads_its_own_norms_and_deleting_there_leaves_the_original():
    model = adapted(tiny_llama())
    expected = logits(model)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin), expected)
    mlp = twin.get_submodule("base_model.model.model.layers.0.mlp")
    assert mlp._stream_norm is twin.get_submodule("base_model.model.model.layers.0.post_attention_layernorm")
    twin.delete_adapter("default")
    assert stream_hooks(twin) == 0
    assert stream_hooks(model) == 2
    assert torch.equal(logits(model), expected)


def test_no_stream_tensor_outlives_a_forward():
    model = adapted(tiny_llama())
    logits(model)
    assert all(layer._stream is None for _, layer in model.adapter_layers())
    with model.disable_adapter():
        logits(model)
    assert all(layer._stream is None for _, layer in model.adapter_layers())


def test_a_block_run_without_its_norm_says_what_it_missed():
    model = adapted(tiny_llama())
    mlp = model.get_submodule("base_model.model.model.layers.0.mlp")
    with pytest.raises(
        RuntimeError, match="reads the residual stream at the input of LlamaRMSNorm, which did not run"
    ):
        mlp(torch.randn(1, 3, 32))


def test_a_config_saved_before_parallel_input_existed_loads_reading_the_block_input(tmp_path):
    base = tiny_llama()
    old = adapted(
        tiny_llama(), BottleneckConfig(style="parallel", reduction_factor=4, parallel_input="block_input")
    )
    base.load_state_dict(old.base_model.model.state_dict(), strict=False)
    old.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    del saved["parallel_input"]  # as peftkit-bottleneck 0.3 wrote it
    config_path.write_text(json.dumps(saved))

    loaded = PeftModel.from_pretrained(base, tmp_path)

    assert loaded.peft_config["default"].parallel_input == "block_input"
    assert torch.equal(logits(loaded), logits(old))


def test_a_model_without_a_known_norm_needs_block_input():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

        def forward(self, h):
            return h + self.ff(h)

    with pytest.raises(TargetModulesError, match="set parallel_input='block_input' to read the feed-forward"):
        get_peft_model(Plain(), BottleneckConfig(style="parallel", feedforward_modules=["ff"]))
    model = get_peft_model(
        Plain(), BottleneckConfig(style="parallel", feedforward_modules=["ff"], parallel_input="block_input")
    )
    assert model.get_submodule("base_model.model.ff").placement == {"default": "beside"}


def test_named_mlps_on_a_known_layout_still_read_the_stream():
    model = adapted(
        tiny_llama(), BottleneckConfig(style="parallel", reduction_factor=4, feedforward_modules=["mlp"])
    )
    assert stream_hooks(model) == 2
    assert torch.equal(logits(model), logits(adapted(tiny_llama())))


def test_training_with_gradient_checkpointing_gives_the_plain_gradients():
    def gradients(checkpointing):
        model = adapted(tiny_llama())
        if checkpointing:  # transformers 5's name, and 4's
            base = model.base_model.model
            enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain and all(grad is not None and grad.abs().sum() > 0 for grad in plain.values())
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name


def test_compiles_to_one_graph_with_the_eager_outputs(peftkit_fresh_dynamo):
    model = adapted(tiny_llama()).eval()
    expected = logits(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(logits(compiled), expected)
    assert all(layer._stream is None for _, layer in model.adapter_layers())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_stays_near_float32(dtype):
    model = adapted(tiny_llama()).eval()
    expected = logits(model)
    with torch.autocast("cpu", dtype=dtype):
        got = logits(model).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 3e-2


def test_named_blocks_without_the_norm_beside_them_are_refused_by_name():
    config = BottleneckConfig(style="parallel", reduction_factor=4, feedforward_modules=["up_proj"])
    with pytest.raises(
        TargetModulesError,
        match=r"'model\.layers\.0\.mlp\.up_proj' reads the residual stream at the input of its sibling "
        r"'post_attention_layernorm', which 'model\.layers\.0\.mlp' does not have",
    ):
        get_peft_model(tiny_llama(), config)


def test_a_layer_reads_the_stream_at_one_norm_and_only_once_told_where():
    model = adapted(tiny_llama())
    mlp = model.get_submodule("base_model.model.model.layers.0.mlp")
    mlp.read_stream_at(mlp._stream_norm)  # the same norm again: nothing changes
    assert len(mlp._stream_norm._forward_pre_hooks) == 1
    with pytest.raises(ValueError, match="LlamaMLP already reads the residual stream at another module"):
        mlp.read_stream_at(nn.LayerNorm(32))
    bare = BottleneckLayer(nn.Linear(32, 32), mlp.features)
    with pytest.raises(ValueError, match=r"a beside_stream adapter needs read_stream_at\(norm\) first"):
        bare.update_layer("x", PARALLEL, "mlp", placement="beside_stream")
