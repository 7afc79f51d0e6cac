"""LoRA on parameters (``LoraConfig.target_parameters``): the fused 3-D expert tensors of MoE models, as PEFT's
``lora.ParamWrapper`` adapts them (layout, nesting, key names, refusals), checked against PEFT itself."""

from __future__ import annotations

import copy
import json
import re

import peft
import peftkit
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peftkit.errors import ConfigError, TargetModulesError
from peftkit.testing import ConformanceSuite
from peftkit.testing.models import randomize_trainable
from peftkit_lora import LoraConfig
from peftkit_lora.parameter import ParameterLoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config).eval()


def tiny_qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config).eval()


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}


def inputs():
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids)


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def experts_of(model, layer=0):
    return model.base_model.model.model.layers[layer].mlp.experts


# --- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field", "wanted"),
    [
        (dict(lora_dropout=0.1), "lora_dropout", "0.0 when target_parameters is set"),
        (dict(use_dora=True), "use_dora", "False when target_parameters is set"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out", "False when target_parameters is set"),
        (dict(lora_bias=True), "lora_bias", "peftkit-lora does not implement lora_bias"),
    ],
)
def test_config_refuses_what_peft_cannot_apply_to_a_parameter(kwargs, field, wanted):
    with pytest.raises(ConfigError) as error:
        LoraConfig(target_parameters=EXPERTS, **kwargs)
    assert f"LoraConfig.{field} must be" in str(error.value) and wanted in str(error.value)


@pytest.mark.parametrize("bad", ["mlp.experts.down_proj", [""], ["ok", 3]])
def test_config_wants_a_list_of_parameter_names(bad):
    with pytest.raises(ConfigError, match=r"LoraConfig\.target_parameters must be a list of parameter names"):
        LoraConfig(target_parameters=bad)


def test_config_writes_target_parameters_sorted_as_peft_does():
    assert LoraConfig(target_parameters=EXPERTS).target_parameters == sorted(EXPERTS)
    assert LoraConfig(target_parameters=[]).target_parameters == []  # PEFT's "none", dropout allowed
    assert LoraConfig(target_parameters=None, lora_dropout=0.1).lora_dropout == 0.1


# --- injection ------------------------------------------------------------------------------------
def test_two_parameters_of_one_module_nest_and_save_under_peft_keys(tmp_path):
    ours = peftkit.get_peft_model(tiny_mixtral(), LoraConfig(r=2, target_parameters=EXPERTS))
    outer = experts_of(ours)
    assert isinstance(outer, ParameterLoraLayer) and outer.parameter_name == "down_proj"
    assert (
        isinstance(outer.base_layer, ParameterLoraLayer) and outer.base_layer.parameter_name == "gate_up_proj"
    )
    # one (r, in) block of A and one (out, r) slice of B per expert: gate_up_proj is (4, 128, 64)
    assert outer.base_layer.lora_A["default"].weight.shape == (2 * 4, 64)
    assert outer.base_layer.lora_B["default"].weight.shape == (128, 2 * 4)

    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=2, target_parameters=EXPERTS))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_saved = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_saved.items()} == {k: v.shape for k, v in theirs_saved.items()}
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight" in ours_saved
    config = peftkit.serialization.load_config(tmp_path / "ours")
    assert config.target_modules == [] and config.target_parameters == sorted(EXPERTS)


def test_target_modules_and_parameters_together():
    model = peftkit.get_peft_model(
        tiny_mixtral(), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["down_proj"])
    )
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in name for name in names)
    assert any("experts.lora_A" in name for name in names)


def test_no_matching_parameter_is_an_error():
    with pytest.raises(TargetModulesError, match="target_parameters=.*matched no parameter"):
        peftkit.get_peft_model(tiny_mixtral(), LoraConfig(target_parameters=["experts.up_proj"]))


def test_a_parameter_of_another_rank_is_refused_naming_its_shape():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Module()
            self.block.scale = nn.Parameter(torch.ones(4))
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) * self.block.scale

    with pytest.raises(
        ValueError, match=r"Module\.scale has shape \(4,\); LoRA adapts 2-D \(out, in\) and 3-D"
    ):
        peftkit.get_peft_model(Scaled(), LoraConfig(target_parameters=["block.scale"]))


def test_adapters_must_target_the_same_parameters():
    model = peftkit.get_peft_model(tiny_mixtral(), LoraConfig(target_parameters=EXPERTS))
    with pytest.raises(ValueError, match="must all target the same parameters"):
        model.add_adapter("other", LoraConfig(target_parameters=["mlp.experts.down_proj"]))


def test_a_parameter_of_an_adapted_module_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TargetModulesError, match="already adapted as a module"):
        peftkit.get_peft_model(model, LoraConfig(target_modules=["0"], target_parameters=["0.weight"]))


# --- the forward math -----------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    experts=st.integers(1, 4),
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    r=st.integers(1, 3),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_expert_gets_its_own_low_rank_delta(experts, rows, cols, r, transposed, seed):
    """ΔW_e = s · B_e A_e with A_e = A[e·r:(e+1)·r] and B_e = B[:, e::experts], laid out like the parameter."""
    generator = torch.Generator().manual_seed(seed)
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(experts, rows, cols, generator=generator))
    module.is_transposed = transposed
    layer = ParameterLoraLayer(module, "weight")
    layer.update_layer("a", LoraConfig(r=r, lora_alpha=3, init_lora_weights=False), "weight")
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    for e in range(experts):
        delta = 3 / r * b[:, e::experts] @ a[e * r : (e + 1) * r]  # (out, in)
        expected = delta.T if transposed else delta
        torch.testing.assert_close(layer.delta_weight("a")[e], expected, rtol=1e-5, atol=1e-6)
    adapted = layer.adapted(module.weight.detach(), ["a"])
    torch.testing.assert_close(adapted, module.weight + layer.delta_weight("a"), rtol=1e-5, atol=1e-5)


class Holder(nn.Module):
    def __init__(self, shape, transposed, seed):
        super().__init__()
        self.experts = nn.Module()
        self.experts.weight = nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))
        self.experts.is_transposed = transposed

    def forward(self, x):
        return x


@settings(max_examples=20, deadline=None)
@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
        st.tuples(st.integers(1, 5), st.integers(1, 5)),
    ),
    r=st.integers(1, 3),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_delta_and_merged_weight_equal_peft_param_wrapper(shape, r, transposed, seed):
    """Same A and B in PEFT's ParamWrapper and here give the same ΔW and the same merged parameter.

    Not drawn: one expert stored transposed, ``(1, in, out)``, where PEFT's ΔW is ``(out, in)`` (its
    single-expert branch ignores ``is_transposed``); peftkit gives ``ΔWᵀ`` there, as for several experts."""
    assume(not (len(shape) == 3 and shape[0] == 1 and transposed))
    config = dict(r=r, lora_alpha=5, target_parameters=["experts.weight"], init_lora_weights=False)
    theirs = peft.get_peft_model(Holder(shape, transposed, seed), peft.LoraConfig(**config))
    ours = peftkit.get_peft_model(Holder(shape, transposed, seed), LoraConfig(**config))
    their_layer, our_layer = theirs.base_model.model.experts, ours.base_model.model.experts
    assert our_layer.lora_A["default"].weight.shape == their_layer.lora_A["default"].weight.shape
    assert our_layer.lora_B["default"].weight.shape == their_layer.lora_B["default"].weight.shape
    with torch.no_grad():
        our_layer.lora_A["default"].weight.copy_(their_layer.lora_A["default"].weight)
        our_layer.lora_B["default"].weight.copy_(their_layer.lora_B["default"].weight)
    theirs_delta = their_layer.get_delta_weight("default")  # PEFT's single expert: (out, in), unstacked
    torch.testing.assert_close(
        our_layer.delta_weight("default"), theirs_delta.reshape(shape), rtol=1e-5, atol=1e-6
    )
    merged_theirs = theirs.merge_and_unload().experts.weight
    merged_ours = ours.merge_and_unload().experts.weight
    torch.testing.assert_close(merged_ours, merged_theirs, rtol=1e-5, atol=1e-6)


def test_a_2d_parameter_is_one_expert():
    module = nn.Linear(5, 3, bias=False)
    layer = ParameterLoraLayer(module, "weight")
    layer.update_layer("a", LoraConfig(r=2, init_lora_weights=False), "weight")
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.testing.assert_close(layer.delta_weight("a"), 8 / 2 * b @ a)
    x = torch.randn(4, 5)
    layer.set_active(["a"])
    torch.testing.assert_close(layer(x), x @ (module.weight + layer.delta_weight("a")).T)


def test_identity_at_init_and_disable_adapter():
    base = tiny_mixtral()
    expected = logits(base)
    model = peftkit.get_peft_model(base, LoraConfig(target_parameters=EXPERTS))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    randomize_trainable(model)
    assert relative_error(logits(model), expected) > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_a_training_step_changes_only_lora_tensors():
    model = peftkit.get_peft_model(tiny_mixtral(), LoraConfig(r=2, target_parameters=EXPERTS))
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B is zero at init: the second step moves A too
        model(**inputs(), labels=inputs()["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    assert experts_of(model).get_base_layer().gate_up_proj.grad is None


# --- PEFT interop ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_adapter_loads_here_with_same_outputs(arch, tmp_path):
    config = dict(r=2, lora_alpha=4, target_parameters=EXPERTS, rank_pattern={"down_proj": 3})
    theirs = randomize_trainable(peft.get_peft_model(MODELS[arch](), peft.LoraConfig(**config)))
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(MODELS[arch](), tmp_path)
    assert relative_error(logits(ours), expected) < 1e-5


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_our_adapter_loads_in_peft_with_same_outputs(arch, tmp_path):
    config = dict(r=2, lora_alpha=4, target_parameters=EXPERTS, use_rslora=True)
    ours = randomize_trainable(peftkit.get_peft_model(MODELS[arch](), LoraConfig(**config)))
    expected = logits(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path)
    assert relative_error(logits(theirs), expected) < 1e-5


# --- merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_agrees_and_unmerge_restores_the_parameters_bit_for_bit(dtype):
    model = randomize_trainable(
        peftkit.get_peft_model(tiny_mixtral().to(dtype), LoraConfig(r=2, target_parameters=EXPERTS)),
        scale=0.3,
    )
    experts = experts_of(model).get_base_layer()
    original = [experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()]
    unmerged = logits(model)
    model.merge_adapter()
    assert not torch.equal(experts.gate_up_proj, original[0])
    tol = TOL if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(logits(model), unmerged, **tol)
    model.unmerge_adapter()
    assert torch.equal(experts.gate_up_proj, original[0]) and torch.equal(experts.down_proj, original[1])


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    model = randomize_trainable(peftkit.get_peft_model(tiny_mixtral(), LoraConfig(target_parameters=EXPERTS)))
    expected = logits(model)
    plain = model.merge_and_unload()
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), expected, **TOL)


def test_merged_like_peft():
    ours = randomize_trainable(peftkit.get_peft_model(tiny_mixtral(), LoraConfig(target_parameters=EXPERTS)))
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(target_parameters=EXPERTS))
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()), strict=False)
    state = peftkit.serialization.adapter_state_dict(ours, "default")
    peft.set_peft_model_state_dict(theirs, state)
    ours_merged = ours.merge_and_unload().state_dict()
    theirs_merged = theirs.merge_and_unload().state_dict()
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        torch.testing.assert_close(ours_merged[key], theirs_merged[key], **TOL)


# --- mixed batches, several adapters, compile -----------------------------------------------------
def test_weighted_combinations_are_refused_as_in_peft():
    model = peftkit.get_peft_model(tiny_mixtral(), LoraConfig(target_parameters=EXPERTS))
    with pytest.raises(ConfigError, match="add_weighted_adapter does not combine adapters on parameters"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


def test_mixed_batches_are_refused_as_in_peft():
    model = peftkit.get_peft_model(tiny_mixtral(), LoraConfig(target_parameters=EXPERTS))
    with pytest.raises(ValueError, match="adapts the parameter .* cannot differ from row to row"):
        model(**inputs(), adapter_names=["default", "__base__"])


def test_two_active_adapters_add_up():
    model = peftkit.get_peft_model(tiny_mixtral(), LoraConfig(target_parameters=EXPERTS))
    model.add_adapter("other", LoraConfig(r=4, target_parameters=EXPERTS))
    randomize_trainable(model)
    for name in ("default", "other"):
        for _, layer in model.adapter_layers():
            for p in layer.lora_B[name].parameters():
                p.data.normal_(0, 0.1)
    experts = experts_of(model)
    both = experts.adapted(experts.parameter().detach(), ["default", "other"])
    one_by_one = experts.parameter() + experts.delta_weight("default") + experts.delta_weight("other")
    torch.testing.assert_close(both, one_by_one, **TOL)
    model.set_adapter("other")
    expected_other = logits(model)
    model.set_adapter("default")
    assert relative_error(logits(model), expected_other) > 1e-4


class Experts(nn.Module):
    """A fused expert stack read inside its own forward, as transformers' grouped-matmul experts do."""

    def __init__(self, experts=3, hidden=8, inner=6):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner))

    def forward(self, x):  # x: (experts, tokens, hidden)
        gate, up = torch.bmm(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        return torch.bmm(torch.nn.functional.silu(gate) * up, self.down_proj.transpose(1, 2))


def test_compiled_training_step_is_one_graph_and_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(Experts())
    peft_model = randomize_trainable(
        peftkit.get_peft_model(model, LoraConfig(r=2, target_parameters=["gate_up_proj", "down_proj"]))
    )
    layer = peft_model.base_model.model[0]
    x = torch.randn(3, 5, 8)

    def step(module):
        out = module(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]
        peft_model.zero_grad()
        return out.detach(), grads

    eager_out, eager_grads = step(layer)
    torch._dynamo.reset()
    compiled_out, compiled_grads = step(torch.compile(layer, fullgraph=True))
    torch.testing.assert_close(compiled_out, eager_out, **TOL)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, **TOL)


# --- peftkit targets / plan -------------------------------------------------------------------------
@pytest.fixture
def mixtral_folder(tmp_path):
    tiny_mixtral().config.save_pretrained(tmp_path / "mixtral")
    return tmp_path / "mixtral"


def _cli(*args):
    from click.testing import CliRunner
    from peftkit.cli import make_cli

    result = CliRunner().invoke(make_cli(), [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


TARGET_OPTION = 'target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]'


def test_targets_lists_expert_parameters_and_what_the_config_adapts(mixtral_folder):
    listing = _cli("targets", mixtral_folder)
    assert re.search(
        r"model\.layers\.\*\.mlp\.experts\.gate_up_proj\s+MixtralExperts\s+4x128x64\s+2\s+65,536", listing
    )
    report = json.loads(
        _cli("targets", mixtral_folder, "-m", "lora", "-o", TARGET_OPTION, "-o", "r=2", "--json")
    )
    assert report["method"]["matched_count"] == 0 and report["method"]["target_modules"] == []
    adapted = {group["name"]: group for group in report["method"]["parameters"]}
    # gate_up_proj: per layer A (2·4, 64) and B (128, 2·4); two layers
    assert adapted["gate_up_proj"]["adapter_parameters"] == 2 * (8 * 64 + 128 * 8)
    assert adapted["down_proj"]["shape"] == [4, 64, 64] and adapted["down_proj"]["count"] == 2


def test_plan_counts_the_expert_adapters_as_peft_does(mixtral_folder):
    report = json.loads(
        _cli("plan", mixtral_folder, "-m", "lora", "-o", TARGET_OPTION, "-o", "r=2", "--json")
    )
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=2, target_parameters=EXPERTS))
    assert report["trainable_params"] == theirs.get_nb_trainable_parameters()[0]
    assert report["adapted_names"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert report["adapter_tensors"] == 8
    text = _cli("plan", mixtral_folder, "-m", "lora", "-o", TARGET_OPTION, "-o", "r=2")
    assert "Parameters adapted (target_parameters):" in text and "4x128x64" in text


# --- the conformance kit, on linear weights addressed as parameters -------------------------------
class TestParameterLoraConformance(ConformanceSuite):
    """Every property of the kit (identity, merge, exact unmerge, save/load, training, disable, several
    adapters, autocast, compile) for LoRA reached through ``target_parameters`` (2-D weights, one expert)."""

    method = "lora"
    model_kinds = ("llama", "plain")

    def make_config(self, draw, case):
        targets = case.linear_targets[
            :3
        ]  # every adapter on parameters must target the same ones (PEFT's rule)
        return LoraConfig(
            r=draw(st.integers(1, 6), label="r"),
            lora_alpha=draw(st.sampled_from([1, 4, 16]), label="lora_alpha"),
            use_rslora=draw(st.booleans(), label="use_rslora"),
            init_lora_weights=draw(st.sampled_from([True, "gaussian"]), label="init_lora_weights"),
            target_parameters=sorted(f"{target}.weight" for target in targets),
            task_type=case.task_type,
        )
