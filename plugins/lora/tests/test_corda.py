"""CorDA: the adapter takes the top (ipm) or bottom (kpm) components of W·C, C the covariance of each
layer's inputs on the data; the base keeps the residual, so outputs do not change at init; PEFT's
``preprocess_corda`` + ``get_peft_model`` gives the same A, B and residual."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types

import peft
import pytest
import torch

try:
    import attr  # noqa: F401
except ImportError:  # PEFT 0.21's corda.py takes attrs' ``dataclass`` (for a plain record) but PEFT does not
    # depend on attrs; the standard library's does the same for that record
    sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402
from peftkit import CordaConfig, PeftModel, get_peft_model, initialize_from_data  # noqa: E402
from peftkit_lora import LoraConfig  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
VOCAB = 64


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


def make_batches(count=6, length=24, seed=1):
    """Batches of one sequence each, as PEFT's CorDA reads them (it squeezes the batch dimension)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (1, length), generator=g)} for _ in range(count)]


def corda_model(base, method="ipm", r=4, **corda):
    config = LoraConfig(
        r=r,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method, **corda),
    )
    return get_peft_model(copy.deepcopy(base), config)


def targeted(model):
    """{module path: LoRA layer} of a peftkit or PEFT model."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if name.split(".")[-1] in TARGETS
    }


def inputs_by_layer(base, batches):
    """Each targeted layer's inputs, one tensor per forward call, read by forward hooks on the plain model."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, args, _o, name=name: seen.setdefault(name, []).append(args[0])
        )
        for name, module in targeted(base).items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                base(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def covariance_of(calls):
    """(1/n) Σ over calls of XᵀX, each call's rows X scaled by 1/|max X|."""
    terms = []
    for x in calls:
        rows = x.reshape(-1, x.shape[-1]).double()
        rows = rows / rows.max().abs()
        terms.append(rows.T @ rows)
    return torch.stack(terms).mean(0)


def damped(covariance):
    """C + λ·mean(diag C)·I with λ = 0.01·2^k, the first whose inverse is good to 0.05 (Frobenius)."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype)
    damping = 0.01
    while True:
        fixed = covariance + eye * covariance.diagonal().mean() * damping
        if torch.dist(fixed @ torch.linalg.inv(fixed), eye) < 0.05:
            return fixed
        damping *= 2


@pytest.fixture(scope="module")
def batches():
    return make_batches()


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_outputs_unchanged_and_the_base_keeps_w_minus_the_adapter(base, batches, method):
    model = corda_model(base, method)
    initialize_from_data(model, batches, show_progress_bar=False)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, base(input_ids=ids).logits, atol=2e-5, rtol=1e-4
        )
    originals = targeted(base)
    for path, layer in targeted(model).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert b.abs().max() > 0  # the adapter holds part of W, not zero
        rebuilt = layer.get_base_layer().weight + layer.scaling["default"] * (b @ a)
        torch.testing.assert_close(rebuilt, originals[path].weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_the_adapter_is_the_top_or_bottom_components_of_w_times_c(base, batches, method):
    model = corda_model(base, method)
    initialize_from_data(model, batches, show_progress_bar=False)
    inputs = inputs_by_layer(base, batches)
    originals = targeted(base)
    for path, layer in targeted(model).items():
        fixed = damped(covariance_of(inputs[path]))
        u, s, vh = torch.linalg.svd(originals[path].weight.double() @ fixed, full_matrices=False)
        chosen = slice(0, 4) if method == "ipm" else slice(len(s) - 4, len(s))
        expected = u[:, chosen] @ torch.diag(s[chosen]) @ (vh[chosen] @ torch.linalg.inv(fixed))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = layer.scaling["default"] * (b @ a)
        torch.testing.assert_close(delta.double(), expected, atol=2e-4, rtol=1e-3)
        # A's rows span the chosen right factors: √(S/s) (Vᵀ C'⁻¹), each up to its SVD sign
        root = torch.sqrt(s[chosen] / layer.scaling["default"])
        rows = root[:, None] * (vh[chosen] @ torch.linalg.inv(fixed))
        signs = torch.sign((rows * a.double()).sum(1))
        torch.testing.assert_close(a.double() * signs[:, None], rows, atol=2e-4, rtol=1e-3)


def test_the_covariance_is_of_the_layer_inputs(base, batches, tmp_path):
    file = tmp_path / "cov.pt"
    model = corda_model(base, covariance_file=str(file))
    initialize_from_data(model, batches, show_progress_bar=False)
    saved = torch.load(file, weights_only=True)
    inputs = inputs_by_layer(base, batches)
    assert sorted(saved) == sorted(inputs)
    for path, calls in inputs.items():
        assert len(calls) == len(batches)
        torch.testing.assert_close(saved[path].double(), covariance_of(calls), atol=1e-5, rtol=1e-5)


def test_saved_files_are_read_instead_of_the_data(base, batches, tmp_path):
    files = {"cache_file": str(tmp_path / "cache.pt"), "covariance_file": str(tmp_path / "cov.pt")}
    first = corda_model(base, "kpm", **files)
    initialize_from_data(first, batches, show_progress_bar=False)
    cache = torch.load(files["cache_file"], weights_only=True)
    assert sorted(cache) == sorted(
        f"{p}.eigens.{k}" for p in targeted(base) for k in ("U_WC", "S_WC", "V_WC")
    )

    def never_run(_model, _batch):
        raise AssertionError("CorDA ran the model although its cache_file exists")

    again = corda_model(base, "kpm", **files)
    initialize_from_data(again, batches, forward_fn=never_run, show_progress_bar=False)
    from_cov = corda_model(base, "kpm", covariance_file=files["covariance_file"])
    initialize_from_data(from_cov, batches, forward_fn=never_run, show_progress_bar=False)
    for model in (again, from_cov):
        for path, layer in targeted(model).items():
            torch.testing.assert_close(
                layer.lora_A["default"].weight, targeted(first)[path].lora_A["default"].weight
            )
            torch.testing.assert_close(
                layer.get_base_layer().weight, targeted(first)[path].get_base_layer().weight
            )


def test_a_cache_of_another_rank_is_refused(base, batches, tmp_path):
    file = str(tmp_path / "cache.pt")
    initialize_from_data(corda_model(base, cache_file=file), batches, show_progress_bar=False)
    with pytest.raises(
        ValueError, match=r"cache_file holds components of another shape .* at rank 2 .*delete the file"
    ):
        initialize_from_data(corda_model(base, r=2, cache_file=file), batches, show_progress_bar=False)


def test_save_then_load_onto_the_saved_residual_base(base, batches, tmp_path):
    model = corda_model(base, "ipm")
    initialize_from_data(model, batches, show_progress_bar=False)
    with torch.no_grad():  # as after training: the adapter moved away from its start
        for layer in targeted(model).values():
            layer.lora_B["default"].weight.add_(0.05 * torch.randn_like(layer.lora_B["default"].weight))
    ids = batches[1]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["corda_config"] is None  # as PEFT's recipe saves it
    model.unload().save_pretrained(tmp_path / "residual")  # the base now holds W − s·B₀A₀
    loaded = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "residual"), tmp_path / "adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    # PEFT loads the same folders to the same outputs
    theirs = peft.PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "residual"), str(tmp_path / "adapter")
    )
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_same_adapter_and_residual_as_peft_s_preprocess_corda(base, batches, method):
    ours = corda_model(base, method)
    initialize_from_data(ours, batches, show_progress_bar=False)
    theirs_base = copy.deepcopy(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method),
    )

    def run_model():
        for batch in batches:
            theirs_base(**batch)

    preprocess_corda(theirs_base, config, run_model=run_model)
    theirs = peft.get_peft_model(theirs_base, config)
    mine, peft_layers = targeted(ours), targeted(theirs)
    assert sorted(mine) == sorted(peft_layers)
    for path, layer in mine.items():
        other = peft_layers[path]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        pa, pb = other.lora_A["default"].weight, other.lora_B["default"].weight
        # a component's sign is free: A's row and B's column flip together
        signs = torch.sign((a * pa).sum(1))
        assert signs.abs().min() == 1
        torch.testing.assert_close(a * signs[:, None], pa, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(b * signs[None, :], pb, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(
            layer.get_base_layer().weight, other.get_base_layer().weight, atol=1e-5, rtol=1e-4
        )


def test_corda_needs_linear_targets_at_injection(base):
    config = LoraConfig(
        r=2, target_modules=["embed_tokens"], init_lora_weights="corda", corda_config=CordaConfig()
    )
    with pytest.raises(
        ValueError, match=r"init_lora_weights='corda' needs a linear layer, not a embedding one"
    ):
        get_peft_model(copy.deepcopy(base), config)


def test_a_rank_above_the_layer_s_components_is_refused(base, batches):
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="corda", corda_config=CordaConfig()),
    )
    with pytest.raises(ValueError, match=r"is \(32, 32\), so it has 32 components, fewer than its rank r=40"):
        initialize_from_data(model, batches, show_progress_bar=False)


def test_unknown_options_are_refused(base, batches):
    with pytest.raises(TypeError, match=r"CorDA initialisation takes no option\(s\) \['tau'\]"):
        initialize_from_data(corda_model(base), batches, show_progress_bar=False, tau=0.5)


def test_a_layer_the_data_never_reaches_is_named(base):
    model = corda_model(base)

    def only_embed(m, batch):
        m.base_model.model.model.embed_tokens(batch["input_ids"])

    with pytest.raises(
        ValueError, match=r"never ran these layers, so CorDA cannot read their inputs: \[.*q_proj"
    ):
        initialize_from_data(model, make_batches(count=1), forward_fn=only_embed, show_progress_bar=False)


def test_peft_s_run_model_callable_as_the_forward(base, batches):
    """PEFT's ``run_model()`` runs the data itself; as the forward of one placeholder batch it reads the same."""
    from_batches = corda_model(base)
    initialize_from_data(from_batches, batches, show_progress_bar=False)
    from_callable = corda_model(base)
    inner = from_callable.base_model.model

    def run_model():
        for batch in batches:
            inner(**batch)

    initialize_from_data(
        from_callable, [None], forward_fn=lambda _model, _batch: run_model(), show_progress_bar=False
    )
    for path, layer in targeted(from_callable).items():
        torch.testing.assert_close(
            layer.lora_B["default"].weight, targeted(from_batches)[path].lora_B["default"].weight
        )


def test_a_quantized_or_integer_base_weight_is_refused(base, batches):
    model = corda_model(base)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.get_base_layer().weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(
        ValueError, match=r"CorDA needs float32, float16 or bfloat16 base weights; .*q_proj' holds torch.int8"
    ):
        initialize_from_data(model, batches, show_progress_bar=False)


def test_a_second_pass_over_an_initialised_adapter_is_refused(base, batches):
    model = corda_model(base)
    initialize_from_data(model, batches, show_progress_bar=False)
    with pytest.raises(ValueError, match=r"adapter 'default' was already initialised \(its B is not zero\)"):
        initialize_from_data(model, batches, show_progress_bar=False)
