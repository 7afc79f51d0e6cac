"""AdapterFusion over bottleneck adapters, against AdapterHub's fusion math written out here by hand.

At one block, each fused adapter gives ``uᵢ = scaling · up(act(down(read)))``; with ``q = Q·query``,
``kᵢ = K·uᵢ`` and ``vᵢ = V·uᵢ`` the fusion returns ``Σᵢ softmax(q·kᵢ / T)ᵢ vᵢ + residual`` (``read``,
``query`` and ``residual`` the block's output after a block, ``LN(s)``, ``LN(s)`` and ``s`` around BERT's
norm). Also: the presets and initial values, the temperature schedule, training only the fusion and its
regulariser, both folder formats, deleting a fusion, autocast and compile, and what is refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import (
    AdapterLoadError,
    AdapterNameError,
    ConfigError,
    PeftModel,
    TargetModulesError,
    get_peft_model,
)
from peftkit.composition import Average, Fuse, MultiTask, Stack
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_llama
from peftkit_bottleneck import AdapterFusionConfig, BottleneckConfig, BottleneckLayer
from peftkit_lora import LoraConfig
from torch.nn import functional as F

TOL = dict(rtol=1e-5, atol=1e-5)
ACTIVATIONS = {"swish": F.silu, "tanh": torch.tanh, "relu": F.relu}

# AdapterHub's DynamicAdapterFusionConfig and StaticAdapterFusionConfig, written out
DYNAMIC = {
    "key": True,
    "query": True,
    "value": True,
    "query_before_ln": False,
    "regularization": True,
    "residual_before": False,
    "temperature": False,
    "value_before_softmax": True,
    "value_initialized": True,
    "dropout_prob": None,
}
STATIC = {**DYNAMIC, "value": False, "regularization": False, "value_initialized": False}


# tiny models: one intra-op thread (see peftkit.testing.pytest_plugin)
pytestmark = pytest.mark.usefixtures("peftkit_one_thread")


# --- models ----------------------------------------------------------------------------------------------
def with_adapters(base, configs: dict[str, BottleneckConfig]):
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    for seed, name in enumerate(names):
        model.set_adapter(name)
        randomize_trainable(model, seed=seed + 3, scale=0.3)
    return model.eval()


ADAPTERS = {
    "llama_houlsby": (
        tiny_llama,
        {
            "a": BottleneckConfig(style="houlsby", reduction_factor=4),
            "b": BottleneckConfig(style="houlsby", reduction_factor=8, non_linearity="tanh", scaling=0.5),
            "c": BottleneckConfig(style="houlsby", reduction_factor=2, non_linearity="relu", scaling=2.0),
        },
    ),
    "bert_pfeiffer": (
        tiny_bert,
        {
            "a": BottleneckConfig(style="pfeiffer", reduction_factor=4),
            "b": BottleneckConfig(style="pfeiffer", reduction_factor=8, non_linearity="tanh", scaling=0.5),
            "c": BottleneckConfig(style="pfeiffer", reduction_factor=2, scaling=2.0),
        },
    ),
}
LAYER_PATHS = {
    "llama_houlsby": "base_model.model.model.layers.0.mlp",
    "bert_pfeiffer": "base_model.model.bert.encoder.layer.0.output.LayerNorm",
}


def adapters(kind: str, **model_options):
    build, configs = ADAPTERS[kind]
    return with_adapters(build(**model_options), configs)


def fused(kind: str, config="dynamic", fuse=None, seed: int = 9, scale: float = 0.3, **model_options):
    """The kind's adapters with a fusion over ``fuse`` (default a and b), its tensors random, in eval mode."""
    model = adapters(kind, **model_options)
    fuse = fuse if fuse is not None else Fuse("a", "b")
    model.add_adapter_fusion(fuse, config=config, set_active=True)
    randomize_trainable(model, seed=seed, scale=scale)  # only the fusion trains under Fuse
    return model.eval()


def ids(rows: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **extra).logits


def alone(model, adapters_, input_ids) -> torch.Tensor:
    model.set_adapter(adapters_)
    return logits(model, input_ids)


def fusion_layers(model, name: str = "a,b"):
    return [
        layer.adapter_fusion[name]
        for _, layer in model.adapter_layers()
        if isinstance(layer, BottleneckLayer) and name in layer.adapter_fusion
    ]


# --- the references, by hand --------------------------------------------------------------------------------
def adapter(model, layer, name: str, h: torch.Tensor) -> torch.Tensor:
    config = model.peft_config[name]
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    z = ACTIVATIONS[config.non_linearity](F.linear(h, down.weight, down.bias))
    return config.scaling * F.linear(z, up.weight, up.bias)


def layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def fusion_reference(fusion, options, query, outputs, residual, temperature=1.0):
    """AdapterHub's BertFusion: attention of the query over the adapters' outputs (no dropout: eval)."""
    u = torch.stack(outputs, dim=-2)  # (..., adapters, hidden)
    if options["residual_before"]:
        u = u + residual.unsqueeze(-2)
    q = F.linear(query, fusion.query.weight, fusion.query.bias) if options["query"] else query
    k = F.linear(u, fusion.key.weight, fusion.key.bias) if options["key"] else u
    v = F.linear(u, fusion.value.weight) if options["value"] and options["value_before_softmax"] else u
    scores = torch.einsum("...h,...ah->...a", q, k)
    probs = torch.softmax(scores / temperature, dim=-1)
    context = torch.einsum("...a,...ah->...h", probs, v)
    if options["value"] and not options["value_before_softmax"]:
        context = F.linear(context, fusion.value.weight)
    return context if options["residual_before"] else context + residual


def block_reference(kind, model, options, x, children=("a", "b"), name="a,b", temperature=1.0, before=()):
    """The fused block's output on input ``x``: adapters ``before`` stacked first, then the fusion of
    ``children`` (each a name, or a tuple: a stack whose last adapter's output is fused)."""
    layer = model.get_submodule(LAYER_PATHS[kind])
    fusion = layer.adapter_fusion[name]
    if kind == "llama_houlsby":  # state: the MLP's output; the adapters read it
        state = layer.base_layer(x)
        read = lambda s: s  # noqa: E731
    else:  # state: the residual sum s; the adapters read LN(s); the block returns LN(final s)
        state = x
        read = lambda s: layer_norm(layer.base_layer, s)  # noqa: E731
    for other in before:
        state = state + adapter(model, layer, other, read(state))
    outputs = []
    for child in children:
        stack = (child,) if isinstance(child, str) else child
        inner = state
        for other in stack[:-1]:
            inner = inner + adapter(model, layer, other, read(inner))
        outputs.append(adapter(model, layer, stack[-1], read(inner)))
    out = fusion_reference(fusion, options, read(state), outputs, state, temperature)
    return out if kind == "llama_houlsby" else layer_norm(layer.base_layer, out)


def run_block(model, kind, x):
    with torch.no_grad():
        return model.get_submodule(LAYER_PATHS[kind])(x)


# --- the config ------------------------------------------------------------------------------------------
def test_the_presets_are_adapterhubs_dynamic_and_static_configs():
    assert AdapterFusionConfig(adapter_names=["a", "b"]).options() == DYNAMIC
    assert AdapterFusionConfig(adapter_names=["a", "b"], preset="static").options() == STATIC
    # an option given overrides the preset's
    config = AdapterFusionConfig(adapter_names=["a"], preset="static", value=True, temperature=True)
    assert config.options() == {**STATIC, "value": True, "temperature": True}
    # AdapterHub's JSON (value_initialized may be a string there)
    config = AdapterFusionConfig.from_options(["a", "b"], {**STATIC, "value_initialized": "True"})
    assert config.options() == {**STATIC, "value_initialized": True}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"preset": "learned"},
            r"AdapterFusionConfig\.preset must be one of 'dynamic', 'static', got 'learned'",
        ),
        ({"adapter_names": None}, r"AdapterFusionConfig\.adapter_names must be a non-empty list .*got None"),
        ({"adapter_names": []}, r"AdapterFusionConfig\.adapter_names must be a non-empty list .*got \[\]"),
        ({"adapter_names": ["a", 3]}, r"AdapterFusionConfig\.adapter_names must be a non-empty list"),
        (
            {"key": "yes"},
            r"AdapterFusionConfig\.key must be True or False \(None takes the preset's\), got 'yes'",
        ),
        ({"regularization": 1}, r"AdapterFusionConfig\.regularization must be True or False"),
        ({"dropout_prob": 1.5}, r"AdapterFusionConfig\.dropout_prob must be a number in \[0, 1\), got 1\.5"),
        ({"dropout_prob": True}, r"AdapterFusionConfig\.dropout_prob must be a number in \[0, 1\)"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_config_field_errors_name_the_field_and_what_it_takes(fields, message):
    with pytest.raises(ConfigError, match=message):
        AdapterFusionConfig(**{"adapter_names": ["a", "b"], **fields})


def test_unknown_fusion_options_and_configs_are_refused():
    model = adapters("llama_houlsby")
    with pytest.raises(ValueError, match=r"AdapterFusion options \['learned'\] are not AdapterHub's"):
        model.add_adapter_fusion(["a", "b"], config={"learned": True})
    with pytest.raises(
        ConfigError, match=r"add_adapter_fusion\(config=\.\.\.\) takes 'dynamic', 'static'.*got int"
    ):
        model.add_adapter_fusion(["a", "b"], config=3)
    assert "a,b" not in model.peft_config


# --- initial values ----------------------------------------------------------------------------------------
def test_value_initialized_starts_v_at_the_identity_with_1e_6_off_the_diagonal():
    model = adapters("llama_houlsby")
    model.add_adapter_fusion(["a", "b"])
    layers = fusion_layers(model)
    assert len(layers) == 4  # attention and MLP of both decoder layers
    expected = torch.full((32, 32), 1e-6).fill_diagonal_(1.0)
    for fusion in layers:
        assert fusion.value.bias is None
        assert torch.equal(fusion.value.weight, expected)
        for linear in (fusion.query, fusion.key):  # BERT's init: normal(0, 0.02), zero bias
            assert torch.equal(linear.bias, torch.zeros(32))
            assert 0.01 < linear.weight.std().item() < 0.03


def test_without_value_initialized_v_starts_random_and_static_has_no_v():
    model = adapters("llama_houlsby")
    model.add_adapter_fusion(["a", "b"], config={"value_initialized": False})
    model.add_adapter_fusion(["b", "c"], config="static")
    for fusion in fusion_layers(model):
        assert 0.01 < fusion.value.weight.std().item() < 0.03
        assert fusion.value.weight.diagonal().abs().max() < 0.2
    for fusion in fusion_layers(model, "b,c"):
        assert not hasattr(fusion, "value")
        assert fusion.regularization() is None


# --- what a fusion computes ------------------------------------------------------------------------------
VARIANTS = {
    "dynamic": ("dynamic", DYNAMIC),
    "static": ("static", STATIC),
    "value_after_softmax": ({"value_before_softmax": False}, {**DYNAMIC, "value_before_softmax": False}),
    "no_query_no_key": ({"query": False, "key": False}, {**DYNAMIC, "query": False, "key": False}),
    "residual_before": ({"residual_before": True}, {**DYNAMIC, "residual_before": True}),
}
CASES = [
    (kind, variant)
    for kind in LAYER_PATHS
    for variant in VARIANTS
    if not (kind == "bert_pfeiffer" and variant == "residual_before")  # refused there: see below
]


@settings(max_examples=25, deadline=None)
@given(
    adapters=st.integers(2, 5),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    hidden=st.sampled_from([4, 8, 16]),
    variant=st.sampled_from(sorted(VARIANTS)),
    temperature=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_fusion_layer_over_any_number_of_adapters_and_any_shape_is_the_hand_written_fusion(
    adapters, shape, hidden, variant, temperature, seed
):
    from peftkit_bottleneck.fusion import FusionLayer

    options = {**VARIANTS[variant][1], "temperature": temperature}
    names = [f"a{index}" for index in range(adapters)]
    config = AdapterFusionConfig(
        adapter_names=names, **{k: v for k, v in options.items() if k != "dropout_prob"}
    )
    torch.manual_seed(seed)
    fusion = FusionLayer(config, hidden, dropout_prob=0.0).eval()
    generator = torch.Generator().manual_seed(seed)
    query, residual = (torch.randn(*shape, hidden, generator=generator) for _ in range(2))
    outputs = [torch.randn(*shape, hidden, generator=generator) for _ in range(adapters)]
    expected_t = 50.0 if temperature else 1.0
    with torch.no_grad():
        expected = fusion_reference(fusion, options, query, outputs, residual, temperature=expected_t)
        got = fusion(query, torch.stack(outputs, dim=-2), residual)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_fusion_on_one_block_is_adapterhubs_attention_over_the_adapters(kind, variant):
    config, options = VARIANTS[variant]
    model = fused(kind, config)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block_reference(kind, model, options, x)
        # the fusion matters: it is neither one adapter nor the sum of both
        layer = model.get_submodule(LAYER_PATHS[kind])
        model.set_adapter("a")
        assert not torch.allclose(layer(x), expected, atol=1e-4)
    model.set_adapter(Fuse("a", "b"))
    torch.testing.assert_close(run_block(model, kind, x), expected, **TOL)


@pytest.mark.parametrize("kind", sorted(LAYER_PATHS))
def test_a_stack_inside_fuse_fuses_its_last_adapters_output_on_the_stacked_state(kind):
    fuse = Fuse(Stack("a", "c"), "b")
    assert fuse.name == "c,b"  # AdapterHub's: a stack is named by its last adapter
    model = fused(kind, fuse=fuse)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = block_reference(kind, model, DYNAMIC, x, children=(("a", "c"), "b"), name="c,b")
    model.set_adapter(fuse)
    torch.testing.assert_close(run_block(model, kind, x), expected, **TOL)


@pytest.mark.parametrize("kind", sorted(LAYER_PATHS))
def test_a_fusion_inside_a_stack_fuses_the_state_the_adapters_before_made(kind):
    model = fused(kind)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = block_reference(kind, model, DYNAMIC, x, before=("c",))
    model.set_adapter(Stack("c", Fuse("a", "b")))
    torch.testing.assert_close(run_block(model, kind, x), expected, **TOL)


def test_multi_task_rows_with_a_fusion_equal_the_fusions_run():
    model = fused("bert_pfeiffer")
    x = ids(3, seed=4)
    fusion = alone(model, Fuse("a", "b"), x)
    c = alone(model, "c", x)
    model.set_adapter(MultiTask(Fuse("a", "b"), "c"))
    out = logits(model, x, task_ids=[1, 0, 1])
    torch.testing.assert_close(out[1], fusion[1], **TOL)
    torch.testing.assert_close(out[[0, 2]], c[[0, 2]], **TOL)


def test_a_fusion_with_its_own_name_runs_under_that_name():
    model = adapters("llama_houlsby")
    assert model.add_adapter_fusion(["a", "b"], name="mix") == "mix"
    model.set_adapter(Fuse("a", "b", name="mix"))
    assert model.active_adapters == ["a", "b", "mix"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = block_reference("llama_houlsby", model, DYNAMIC, x, name="mix")
    torch.testing.assert_close(run_block(model, "llama_houlsby", x), expected, **TOL)


def test_temperature_starts_at_50_and_falls_by_005_each_forward_to_1():
    model = fused("llama_houlsby", config={"temperature": True})
    layer = model.get_submodule(LAYER_PATHS["llama_houlsby"])
    fusion = layer.adapter_fusion["a,b"]
    assert fusion.temperature.item() == 50.0
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6))
    options = {**DYNAMIC, "temperature": True}
    with torch.no_grad():
        expected = block_reference("llama_houlsby", model, options, x, temperature=50.0)
        # in eval mode too, as AdapterHub's
        torch.testing.assert_close(layer(x), expected, **TOL)
        assert fusion.temperature.item() == pytest.approx(49.95, abs=1e-5)
        expected = block_reference("llama_houlsby", model, options, x, temperature=49.95)
        torch.testing.assert_close(layer(x), expected, **TOL)
        query, outputs = torch.randn(1, 1, 32), torch.randn(1, 1, 2, 32)
        for calls in range(2, 981):
            if calls % 100 == 0:
                assert fusion.temperature.item() == pytest.approx(50.0 - 0.05 * calls, abs=1e-3)
            fusion(query, outputs, query)
        assert fusion.temperature.item() == pytest.approx(1.0, abs=1e-3)
        for _ in range(5):
            fusion(query, outputs, query)
        assert fusion.temperature.item() == 1.0


def test_temperature_cools_in_a_bfloat16_model_too():
    # in bfloat16, 50 - 0.05 rounds back to 50: the schedule must not live in the model's dtype
    model = fused("llama_houlsby", config={"temperature": True}).to(torch.bfloat16)
    x = ids(2, seed=17)
    for _ in range(3):
        assert torch.isfinite(logits(model, x)).all()
    for fusion in fusion_layers(model):
        assert fusion.temperature.dtype == torch.float32
        assert fusion.temperature.item() == pytest.approx(49.85, abs=1e-5)


def test_without_temperature_the_softmax_stays_at_1():
    model = fused("llama_houlsby")
    x = ids(2, seed=7)
    logits(model, x)
    logits(model, x)
    assert all(fusion.temperature.item() == 1.0 for fusion in fusion_layers(model))


# --- training ----------------------------------------------------------------------------------------------
def fusion_parameter_names(model, name="a,b"):
    return {param for param, _ in model.named_parameters() if f".adapter_fusion.{name}." in param}


@pytest.mark.parametrize("config", ["dynamic", {"temperature": True}], ids=["dynamic", "temperature"])
def test_under_fuse_only_the_fusion_trains_and_a_step_changes_only_it(config):
    model = fused("llama_houlsby", config).train()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == fusion_parameter_names(model)
    assert len(trainable) == 4 * 5  # query, key (weight, bias), value (weight) in 4 blocks
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = ids(2, seed=8)
    model(input_ids=x, labels=x).loss.backward()
    for name, param in model.named_parameters():
        if name not in trainable:
            assert param.grad is None, name
    optimizer.step()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed <= trainable
    # every weight moves (the key's bias adds one constant to every adapter's score: no gradient)
    assert {name for name in trainable if name.endswith("weight")} <= changed

    # back to a stack: the adapters train again, the fusion does not
    model.set_adapter(Stack("a", "b"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and not trainable & fusion_parameter_names(model)
    assert all(".a." in name or ".b." in name for name in trainable)


def test_add_adapter_fusion_with_set_active_activates_the_fuse():
    model = adapters("llama_houlsby")
    model.add_adapter_fusion(["a", "c"], set_active=True)
    assert model.active_composition == Fuse("a", "c")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == fusion_parameter_names(model, "a,c")


def regularizer_by_hand(model, name="a,b"):
    eye = torch.eye(32)
    return 0.01 * sum(((eye - fusion.value.weight) ** 2).sum() for fusion in fusion_layers(model, name))


def test_the_regulariser_joins_the_loss_while_training_and_only_then():
    model = fused("llama_houlsby", scale=0.3)  # V far from the identity
    config = model.peft_config["a,b"]
    assert config.regularization
    x = ids(2, seed=9)
    term = regularizer_by_hand(model).detach()
    assert term > 0.1

    def loss_and_value_grads(regularization: bool):
        config.regularization = regularization
        model.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), [fusion.value.weight.grad.clone() for fusion in fusion_layers(model)]

    model.train()
    on, grads_on = loss_and_value_grads(True)
    off, grads_off = loss_and_value_grads(False)
    torch.testing.assert_close(on - off, term, rtol=1e-4, atol=1e-5)
    # its gradient: 0.01 · 2 (V − I)
    for fusion, grad_on, grad_off in zip(fusion_layers(model), grads_on, grads_off):
        torch.testing.assert_close(
            grad_on - grad_off, 0.02 * (fusion.value.weight - torch.eye(32)).detach(), **TOL
        )

    model.eval()
    config.regularization = True
    with torch.no_grad():
        evaluated = model(input_ids=x, labels=x).loss
    torch.testing.assert_close(evaluated, off, **TOL)
    model.train()
    assert model(input_ids=x).loss is None  # no labels, no loss to add to


def test_the_regulariser_for_a_loss_computed_outside_the_model_is_adapterhubs_get_fusion_regularization_loss():
    model = fused("llama_houlsby", scale=0.3)
    torch.testing.assert_close(model.get_fusion_regularization_loss(), regularizer_by_hand(model))
    model.peft_config["a,b"].regularization = False
    assert model.get_fusion_regularization_loss() is None


def test_a_fusion_without_v_adds_no_regulariser():
    model = fused("llama_houlsby", config={**STATIC, "regularization": True}).train()
    config = model.peft_config["a,b"]
    x = ids(2, seed=10)
    with torch.no_grad():
        on = model(input_ids=x, labels=x).loss
        config.regularization = False
        off = model(input_ids=x, labels=x).loss
    torch.testing.assert_close(on, off, rtol=0, atol=0)


# --- saving and loading ------------------------------------------------------------------------------------
def test_peft_folders_of_adapters_and_fusion_load_back_with_the_same_fused_outputs(tmp_path):
    model = fused("llama_houlsby")
    x = ids(2, seed=11)
    expected = alone(model, Fuse("a", "b"), x)
    model.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "a,b", "b", "c"]
    saved = json.loads((tmp_path / "a,b" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTER_FUSION" and saved["adapter_names"] == ["a", "b"]

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", "b")
    assert loaded.load_adapter(tmp_path / "a,b", "a,b") == "a,b"
    loaded.set_adapter(Fuse("a", "b"))
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=0)


def test_from_pretrained_with_all_adapters_loads_a_fusion_after_its_adapters(tmp_path):
    configs = ADAPTERS["llama_houlsby"][1]
    model = with_adapters(tiny_llama(), {"default": configs["a"], "x": configs["b"]})
    model.add_adapter_fusion(["default", "x"], set_active=True)
    randomize_trainable(model, seed=12)
    x = ids(2, seed=12)
    expected = logits(model.eval(), x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, all_adapters=True)
    loaded.set_adapter(Fuse("default", "x"))
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "config"), [("bert_pfeiffer", "dynamic"), ("llama_houlsby", "static")])
def test_an_adapterhub_fusion_folder_loads_back_under_its_name_with_the_same_outputs(kind, config, tmp_path):
    model = fused(kind, config)
    x = ids(2, seed=13)
    expected = alone(model, Fuse("a", "b"), x)
    model.save_pretrained(tmp_path, selected_adapters=["a", "b", "a,b"], format="adapterhub")
    data = json.loads((tmp_path / "a,b" / "adapter_fusion_config.json").read_text())
    assert data["adapter_names"] == ["a", "b"] and data["name"] == "a,b"
    assert data["config"] == (DYNAMIC if config == "dynamic" else STATIC)

    build, configs = ADAPTERS[kind]
    loaded = get_peft_model(build(), configs["c"], "c")
    assert loaded.load_adapter(tmp_path / "a") == "a"
    assert loaded.load_adapter(tmp_path / "b") == "b"
    assert loaded.load_adapter(tmp_path / "a,b") == "a,b"
    assert loaded.peft_config["a,b"].options() == model.peft_config["a,b"].options()
    loaded.set_adapter(Fuse("a", "b"))
    torch.testing.assert_close(logits(loaded.eval(), x), expected, rtol=0, atol=0)


def test_an_adapterhub_fusion_folder_needs_its_adapters_loaded_first(tmp_path):
    model = fused("bert_pfeiffer")
    model.save_pretrained(tmp_path, selected_adapters=["a", "a,b"], format="adapterhub")
    loaded = get_peft_model(tiny_bert(), ADAPTERS["bert_pfeiffer"][1]["c"], "c")
    loaded.load_adapter(tmp_path / "a")
    with pytest.raises(AdapterLoadError, match=r"holds the adapters \['a', 'b'\] together in no block"):
        loaded.load_adapter(tmp_path / "a,b")
    assert "a,b" not in loaded.peft_config


def test_deleting_a_fusion_removes_its_layers_and_leaves_the_adapters():
    model = fused("llama_houlsby")
    x = ids(2, seed=14)
    stack = alone(model, Stack("a", "b"), x)
    model.set_adapter(Fuse("a", "b"))
    model.delete_adapter("a,b")
    assert "a,b" not in model.peft_config
    assert model.active_composition is None and model.active_adapters == ["a", "b"]
    assert not fusion_layers(model)
    assert not any("adapter_fusion" in name for name in model.state_dict())
    with pytest.raises(AdapterNameError, match=r"runs the fusion adapter 'a,b'"):
        model.set_adapter(Fuse("a", "b"))
    torch.testing.assert_close(alone(model, Stack("a", "b"), x), stack, rtol=0, atol=0)
    # and it can be added again
    model.add_adapter_fusion(["a", "b"], set_active=True)
    assert len(fusion_layers(model)) == 4


def test_a_model_with_a_fusion_prints():
    model = fused("llama_houlsby")
    text = repr(model)
    assert "placement={'a': 'after', 'b': 'after', 'c': 'after'}, fusions=['a,b']" in text


# --- paths users take: autocast, compile -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(LAYER_PATHS))
def test_fuse_runs_under_bf16_autocast_close_to_float32(kind):
    model = fused(kind)
    x = ids(3, seed=15)
    expected = logits(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_a_fullgraph_compiled_model_with_fuse_equals_eager_and_cools_its_temperature(peftkit_fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    # one decoder layer: a quicker trace
    model = fused("llama_houlsby", config={"temperature": True}, num_hidden_layers=1)
    x = ids(2, seed=16)

    def at_start():
        for fusion in fusion_layers(model):
            fusion.forwards.zero_()

    at_start()
    expected = logits(model, x)
    at_start()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=x).logits
        torch.testing.assert_close(out, expected, **TOL)
        compiled(input_ids=x)
    assert counter.frame_count == 1
    for fusion in fusion_layers(model):
        assert fusion.temperature.item() == pytest.approx(49.9, abs=1e-5)


# --- what is refused --------------------------------------------------------------------------------------------
def test_fusing_unknown_or_non_bottleneck_adapters_is_refused():
    model = adapters("llama_houlsby")
    with pytest.raises(
        ConfigError, match=r"AdapterFusion 'a,z' fuses \['z'\], which this model does not have"
    ):
        model.add_adapter_fusion(["a", "z"])
    model.add_adapter("l", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(
        ConfigError,
        match=r"AdapterFusion 'a,l' fuses 'l', a LoraConfig adapter; AdapterFusion fuses bottleneck",
    ):
        model.add_adapter_fusion(["a", "l"])
    assert sorted(model.peft_config) == ["a", "b", "c", "l"]  # the refused fusions left nothing behind
    assert not any(
        layer.adapter_fusion for _, layer in model.adapter_layers() if isinstance(layer, BottleneckLayer)
    )


def test_fusing_parallel_adapters_is_refused_when_added_and_when_set():
    model = with_adapters(
        tiny_llama(),
        {
            "p": BottleneckConfig(style="parallel", reduction_factor=4),
            "q": BottleneckConfig(style="parallel", reduction_factor=8),
            "s": BottleneckConfig(style="houlsby", reduction_factor=4),
            "t": BottleneckConfig(style="houlsby", reduction_factor=8),
        },
    )
    with pytest.raises(ConfigError, match=r"fuses 'p', a parallel bottleneck adapter; fuse sequential"):
        model.add_adapter_fusion(["p", "q"])
    model.add_adapter_fusion(["s", "t"])
    # a Fuse of the parallel adapters that names the fusion of others is refused for that
    with pytest.raises(
        ConfigError, match=r"runs the fusion adapter 's,t', which fuses \['s', 't'\], not \['p', 'q'\]"
    ):
        model.set_adapter(Fuse("p", "q", name="s,t"))


def test_a_fuse_naming_the_fusion_of_other_adapters_is_refused():
    # it ran: the fusion's Q, K and V fit any number of adapters, so it attended over the wrong ones
    model = adapters("llama_houlsby")
    model.add_adapter_fusion(["a", "b"])
    with pytest.raises(
        ConfigError, match=r"runs the fusion adapter 'a,b', which fuses \['a', 'b'\], not \['a', 'c'\]"
    ):
        model.set_adapter(Fuse("a", "c", name="a,b"))


@pytest.mark.parametrize("fuse", [Fuse("a", "b"), Fuse("b", "a")], ids=repr)
def test_a_fuse_without_its_fusion_adapter_is_refused(fuse):
    model = adapters("llama_houlsby")
    if fuse.name == "b,a":
        model.add_adapter_fusion(["a", "b"])  # the order names the fusion
    with pytest.raises(
        AdapterNameError, match=rf"runs the fusion adapter '{fuse.name}', and this model has none"
    ):
        model.set_adapter(fuse)


def test_a_fuse_naming_an_adapter_that_is_no_fusion_is_refused():
    model = adapters("llama_houlsby")
    with pytest.raises(
        ConfigError, match=r"runs 'c' as its fusion, and 'c' is a bottleneck adapter, which fuses nothing"
    ):
        model.set_adapter(Fuse("a", "b", name="c"))


@pytest.mark.parametrize("option", ["query_before_ln", "residual_before"])
def test_options_reading_before_the_norm_are_refused_for_adapters_reading_the_sum(option):
    model = adapters("bert_pfeiffer")  # original_ln_before=True
    model.add_adapter_fusion(["a", "b"], config={option: True})
    with pytest.raises(ConfigError, match=rf"fusion 'a,b' has {option}=True, .*original_ln_before=True"):
        model.set_adapter(Fuse("a", "b"))
    assert model.active_composition is None


def test_a_fusion_over_adapters_that_share_no_block_is_refused():
    model = with_adapters(
        tiny_llama(),
        {
            "m": BottleneckConfig(style="pfeiffer", original_ln_before=False, feedforward_modules=["mlp"]),
            "s": BottleneckConfig(
                style="pfeiffer", original_ln_before=False, feedforward_modules=["self_attn"]
            ),
        },
    )
    with pytest.raises(TargetModulesError, match=r"the adapters \['m', 's'\] share no block of the model"):
        model.add_adapter_fusion(["m", "s"])
    assert "m,s" not in model.peft_config


def test_a_composition_over_a_fusion_adapter_itself_is_refused():
    model = fused("llama_houlsby")
    with pytest.raises(
        ConfigError, match=r"adapter 'a,b' is a adapter_fusion adapter, which cannot take part in"
    ):
        model.set_adapter(Stack("a,b", "c"))


def test_fusion_and_average_side_by_side_keep_the_adapters_frozen_only_under_fuse():
    model = fused("llama_houlsby").train()
    model.set_adapter(Average("a", "b"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and not trainable & fusion_parameter_names(model)
    model.set_adapter(Fuse("a", "b"))
    assert {
        name for name, param in model.named_parameters() if param.requires_grad
    } == fusion_parameter_names(model)


def test_a_fused_adapter_with_a_head_and_a_fusion_with_a_head_are_refused_together():
    # the fused adapter's frozen head would serve every row, and the fusion's would train unused
    configs = {
        "a": BottleneckConfig(style="houlsby", reduction_factor=4, modules_to_save=["lm_head"]),
        "b": BottleneckConfig(style="houlsby", reduction_factor=4),
    }
    model = with_adapters(tiny_llama(), configs)
    model.add_adapter_fusion(
        ["a", "b"], config=AdapterFusionConfig(adapter_names=["a", "b"], modules_to_save=["lm_head"])
    )
    with pytest.raises(
        ConfigError, match=r"adapters \['a', 'a,b'\] each have modules_to_save .*counting the fusions"
    ):
        model.set_adapter(Fuse("a", "b"))
