"""EVA: A starts at the top principal directions of each layer's inputs, ranks follow explained variance,
and the adapter is plain LoRA afterwards (PEFT loads it; PEFT's EVA finds the same A)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peftkit import EvaConfig, PeftModel, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights
from peftkit_lora import LoraConfig
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

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


def make_batches(count=2, batch=4, length=16, seed=1, pad=True, labels=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad:
            mask[0, -5:] = 0  # a padded row: its last tokens are not read
        item = {"input_ids": ids, "attention_mask": mask}
        if labels:
            item["labels"] = torch.where(torch.rand(batch, length, generator=g) < 0.4, -100, ids)
        out.append(item)
    return out


def eva_model(base, rho=2.0, **eva):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho, **eva),
    )
    return get_peft_model(copy.deepcopy(base), config)


def layer_inputs(base, batches, keep):
    """Each targeted layer's input rows over all batches, at the positions ``keep(batch)`` marks."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, args, _o, name=name: rows.setdefault(name, []).append(args[0])
        )
        for name, module in base.named_modules()
        if name.split(".")[-1] in TARGETS
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = keep(batch)
                for name in rows:
                    rows[name][-1] = rows[name][-1][mask]
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).double() for name, parts in rows.items()}


def principal(x: torch.Tensor):
    """The SVD of the centred rows: singular values and right-singular vectors."""
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return s, vh


def assert_same_directions(a: torch.Tensor, b: torch.Tensor, tol: float):
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).abs()
    assert cos.min() > 1 - tol, cos


def lora_a(model, path):
    return model.base_model.model.get_submodule(path).lora_A["default"].weight.detach()


def attention_positions(batch):
    return batch["attention_mask"].bool()


# --- what EVA computes ---------------------------------------------------------------------------------
def test_a_rows_are_the_top_right_singular_vectors_of_the_layer_inputs(base):
    batches = make_batches(count=1)  # one batch: the incremental PCA is exact
    model = eva_model(base, rho=1.0)  # rho 1: no redistribution, every layer keeps r = 4
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    inputs = layer_inputs(base, batches, attention_positions)
    assert len(inputs) == 6
    for path, x in inputs.items():
        a = lora_a(model, path)
        assert a.shape == (4, x.shape[1])
        assert_same_directions(a, principal(x)[1][:4], 1e-4)
    assert model.peft_config["default"].rank_pattern == {}


def test_whitened_rows_are_divided_by_the_root_of_their_singular_values(base):
    batches = make_batches(count=1)
    model = eva_model(base, rho=1.0, whiten=True)
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    for path, x in layer_inputs(base, batches, attention_positions).items():
        s, vh = principal(x)
        a = lora_a(model, path).double()
        assert_same_directions(a, vh[:4], 1e-4)
        # 1 / √S_i, S of all the rows the PCA read (the batch as often as it took to converge): a common factor
        scaled = a.norm(dim=1) * s[:4].sqrt()
        torch.testing.assert_close(scaled, scaled[:1].expand(4), rtol=1e-4, atol=0)
        assert not torch.allclose(a.norm(dim=1), torch.ones(4, dtype=a.dtype), atol=1e-2)


def test_ranks_go_to_the_directions_that_explain_the_most_variance(base):
    batches = make_batches(count=1)
    model = eva_model(base, rho=2.0)
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    inputs = layer_inputs(base, batches, attention_positions)
    # the budget (6 layers · r = 4) goes to the 24 largest explained-variance ratios, each layer offering 8
    offers = []
    for path, x in inputs.items():
        s = principal(x)[0]
        offers += [(float(ratio), path) for ratio in (s.square() / s.square().sum())[:8]]
    expected = {path: 0 for path in inputs}
    for _, path in sorted(offers, reverse=True)[:24]:
        expected[path] += 1
    assert sum(expected.values()) == 24 and set(expected.values()) != {4}  # the test data redistributes
    config = model.peft_config["default"]
    for path, rank in expected.items():
        assert lora_a(model, path).shape[0] == rank
        assert config.rank_pattern.get(path, config.r) == rank
        # adjust_scaling_factors: alpha grows with the rank, so alpha / rank stays lora_alpha / r
        assert config.alpha_pattern.get(path, config.lora_alpha) == pytest.approx(8 * rank / 4)
        assert_same_directions(lora_a(model, path), principal(inputs[path])[1][:rank], 1e-4)


def test_b_is_zero_so_outputs_are_unchanged_and_the_adapter_trains(base):
    batches = make_batches()
    model = eva_model(base)
    with torch.no_grad():
        expected = base(**batches[0]).logits
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    for _, layer in model.adapter_layers():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, expected, rtol=0, atol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    model(**batches[0], labels=batches[0]["input_ids"]).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_B" in name)


def test_label_mask_leaves_out_the_positions_labelled_minus_100(base):
    batches = make_batches(count=1, labels=True)
    masked = eva_model(base, rho=1.0)
    initialize_lora_eva_weights(masked, batches, show_progress_bar=False)
    unmasked = eva_model(base, rho=1.0, use_label_mask=False)
    initialize_lora_eva_weights(unmasked, batches, show_progress_bar=False)
    kept = layer_inputs(base, batches, lambda b: b["attention_mask"].bool() & (b["labels"] != -100))
    everything = layer_inputs(base, batches, attention_positions)
    path = "model.layers.0.self_attn.q_proj"
    assert_same_directions(lora_a(masked, path), principal(kept[path])[1][:4], 1e-4)
    assert_same_directions(lora_a(unmasked, path), principal(everything[path])[1][:4], 1e-4)
    assert not torch.allclose(lora_a(masked, path).abs(), lora_a(unmasked, path).abs(), atol=1e-3)


# --- afterwards, a plain LoRA adapter --------------------------------------------------------------------
def test_saved_adapter_loads_in_peft_with_equal_outputs(base, tmp_path):
    batches = make_batches()
    model = eva_model(base)
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    torch.manual_seed(2)
    with torch.no_grad():  # as after training: B no longer zero
        for _, layer in model.adapter_layers():
            layer.lora_B["default"].weight.normal_(std=0.1)
        ours = model(**batches[0]).logits
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        with torch.no_grad():
            theirs = theirs_model(**batches[0]).logits
        again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        with torch.no_grad():
            reloaded = again(**batches[0]).logits
    assert not torch.allclose(ours, base(**batches[0]).logits.detach(), atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())
    torch.testing.assert_close(reloaded, ours, rtol=0, atol=0)
    for path, layer in model.adapter_layers():
        assert theirs_model.base_model.model.get_submodule(path).lora_A["default"].weight.shape == (
            layer.lora_A["default"].weight.shape
        )


def test_peft_s_eva_finds_the_same_ranks_and_directions(base):
    batches = make_batches()
    ours = eva_model(base)
    initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft.EvaConfig()
        )
        theirs = peft.get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True)
        peft.initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    assert ours.peft_config["default"].alpha_pattern == theirs.peft_config["default"].alpha_pattern
    for path, layer in ours.adapter_layers():
        # PEFT's PCA is a randomized SVD (torch.svd_lowrank); directions agree to its accuracy
        theirs_a = theirs.base_model.model.get_submodule(path).lora_A["default"].weight.detach()
        assert_same_directions(layer.lora_A["default"].weight.detach(), theirs_a, 1e-3)


def test_a_state_dict_computed_on_the_plain_model_initialises_the_same(base):
    batches = make_batches(count=1)
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    state = get_eva_state_dict(copy.deepcopy(base), batches, peft_config=config, show_progress_bar=False)
    assert sorted(state) == sorted(layer_inputs(base, batches, attention_positions))
    from_state = get_peft_model(copy.deepcopy(base), config)
    initialize_lora_eva_weights(from_state, eva_state_dict=state)
    direct = eva_model(base, rho=1.0)
    initialize_lora_eva_weights(direct, batches, show_progress_bar=False)
    for path, layer in direct.adapter_layers():
        torch.testing.assert_close(lora_a(from_state, path), layer.lora_A["default"].weight.detach())


def test_a_layer_given_rank_0_loses_its_adapter(base, tmp_path):
    batches = make_batches(count=1)
    model = eva_model(base)
    state = get_eva_state_dict(model, batches, show_progress_bar=False)
    dropped = "model.layers.1.mlp.down_proj"
    state["base_model.model." + dropped] = state["base_model.model." + dropped][:0]
    initialize_lora_eva_weights(model, eva_state_dict=state)
    assert isinstance(model.base_model.model.get_submodule(dropped), nn.Linear)
    assert dropped not in model.peft_config["default"].target_modules
    assert len(model.peft_config["default"].target_modules) == 5
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(theirs.base_model.model.get_submodule(dropped), nn.Linear)


def test_inputs_of_any_model_with_prepare_functions_off():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    data = [torch.randn(32, 8) @ torch.diag(torch.linspace(3, 0.1, 8)) for _ in range(2)]
    config = LoraConfig(r=2, target_modules=["0"], init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    model = get_peft_model(mlp, config)
    initialize_lora_eva_weights(
        model,
        [data[0]],
        forward_fn=lambda m, x: m(x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    assert_same_directions(lora_a(model, "0"), principal(data[0].double())[1][:2], 1e-4)


# --- errors --------------------------------------------------------------------------------------------
def test_an_adapter_not_made_for_eva_is_refused(base):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(
        ValueError,
        match=r"init_lora_weights='eva'; adapter 'default' is LoraConfig\(init_lora_weights=True\)",
    ):
        initialize_lora_eva_weights(model, make_batches())


def test_an_empty_dataloader_is_refused(base):
    with pytest.raises(ValueError, match=r"the dataloader is empty"):
        initialize_lora_eva_weights(eva_model(base), [])
    with pytest.raises(ValueError, match=r"EVA's dataloader is empty"):
        initialize_lora_eva_weights(eva_model(base), iter([]))


def test_no_dataloader_and_no_state_dict_is_refused(base):
    with pytest.raises(ValueError, match=r"needs a dataloader, or an eva_state_dict"):
        initialize_lora_eva_weights(eva_model(base))


def test_a_plain_model_is_refused(base):
    with pytest.raises(TypeError, match=r"needs a peftkit PeftModel .*got LlamaForCausalLM"):
        initialize_lora_eva_weights(base, make_batches())


def test_batches_the_default_functions_cannot_read_are_named(base):
    mlp = nn.Sequential(nn.Linear(8, 8))
    config = LoraConfig(r=2, target_modules=["0"], init_lora_weights="eva", eva_config=EvaConfig())
    model = get_peft_model(mlp, config)
    with pytest.raises(TypeError, match=r"needs each batch to be a dict .*pass prepare_model_inputs_fn=None"):
        initialize_lora_eva_weights(model, [torch.randn(16, 8)], forward_fn=lambda m, x: m(x))


def test_a_layer_input_that_is_no_tensor_is_named():
    class Pairs(nn.Module):  # a layer that takes its input as a (tensor, tensor) pair
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(
        Pairs(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights="eva", eva_config=EvaConfig())
    )
    with pytest.raises(
        TypeError, match=r"EVA cannot read the input of layer 'base_model.model.proj': it is a dict"
    ):
        initialize_lora_eva_weights(
            model,
            [torch.randn(8, 4)],
            forward_fn=lambda m, x: m(x),
            prepare_model_inputs_fn=None,
            prepare_layer_inputs_fn=lambda layer_input, _model_input, name: _read_first(layer_input, name),
            show_progress_bar=False,
        )


def _read_first(layer_input, name):
    from peftkit_lora.eva_init import prepare_layer_inputs_fn_default

    return prepare_layer_inputs_fn_default({"x": layer_input[0]}, None, name)


def test_batches_with_fewer_rows_than_directions_are_named(base):
    tiny = [
        {"input_ids": torch.randint(0, VOCAB, (1, 4)), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    ]
    with pytest.raises(
        ValueError, match=r"never received 8 input rows in one batch, as EVA needs for its 8 directions"
    ):
        initialize_lora_eva_weights(eva_model(base), tiny, show_progress_bar=False)


def test_unknown_layer_names_for_prepare_functions_are_named(base):
    with pytest.raises(
        ValueError, match=r"prepare_layer_inputs_fn names layers EVA does not initialise: \['nope'\]"
    ):
        initialize_lora_eva_weights(eva_model(base), make_batches(), prepare_layer_inputs_fn={"nope": None})


def test_the_core_entry_says_when_a_method_has_no_data_driven_init(base):
    from peftkit import IA3Config, initialize_from_data

    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"adapter 'default' \(ia3\) has no data-driven initialisation"):
        initialize_from_data(model, make_batches())


def test_layers_that_never_converge_are_taken_as_they_stand_with_a_warning(base, monkeypatch):
    from peftkit_lora import eva_init

    monkeypatch.setattr(eva_init, "MAX_PASSES", 2)
    model = eva_model(base, tau=1.0)  # cosine similarity 1 between batches is not met in floating point
    with pytest.warns(UserWarning, match=r"after 2 passes over the data, the inputs of \[.*\] still had not"):
        initialize_lora_eva_weights(model, make_batches(), show_progress_bar=False)
    path = "model.layers.0.self_attn.q_proj"
    assert lora_a(model, path).abs().sum() > 0  # initialised from the data read
