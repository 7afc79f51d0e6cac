"""Swapping adapters in a compiled model without recompiling: hot-swaps after
``prepare_model_for_compiled_hotswap``, ``set_adapter``, and mixed batches naming other adapters.

Recompiles are counted with ``error_on_recompile`` (a recompile fails the call) and dynamo's count of
graphs. Compiles use the ``aot_eager`` backend (dynamo and AOT autograd, no code generation), except one
with inductor, the compiler users run. Every output is compared with an eagerly loaded model of that adapter.
"""

from __future__ import annotations

import json
import warnings

import peft
import peftkit
import pytest
import torch
from peftkit import AdapterLoadError, PeftModel, hotswap_adapter, prepare_model_for_compiled_hotswap
from peftkit.testing.models import tiny_llama, tiny_plain
from peftkit_ia3 import IA3Config
from peftkit_lora import LoraConfig
from peftkit_lora.layer import LoraLayer
from safetensors.torch import load_file
from torch._dynamo.utils import counters

IDS = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)
# rank and fields of the adapters swapped in turn: ranks 4 to 16, every way a LoRA scale is set
SWAPS = [
    dict(r=4, lora_alpha=8),
    dict(r=16, lora_alpha=4),
    dict(r=2, lora_alpha=32, use_rslora=True),
    dict(r=8, lora_alpha=3, alpha_pattern={"v_proj": 20}, rank_pattern={"down_proj": 3}),
    dict(r=6, lora_alpha=13),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def save_lora(folder, seed, model=tiny_llama, **fields):
    """A LoRA adapter with random (non-identity) weights drawn from ``seed``, saved to ``folder``."""
    config = LoraConfig(**({"r": 4, "target_modules": TARGETS, "init_lora_weights": False} | fields))
    base = model()
    torch.manual_seed(seed)
    peftkit.get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [save_lora(root / str(i), seed=i, **fields) for i, fields in enumerate(SWAPS)]


def logits(model, **kwargs):
    with torch.no_grad():
        out = model(input_ids=IDS, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def eager(folder):
    """The reference: a fresh base model with the adapter loaded eagerly."""
    return logits(PeftModel.from_pretrained(tiny_llama(), folder))


def no_recompile():
    return torch._dynamo.config.patch(error_on_recompile=True)


def swap_with_function(model, folder):
    hotswap_adapter(model, folder, adapter_name="default")


def swap_with_load_adapter(model, folder):
    getattr(model, "_orig_mod", model).load_adapter(folder, "default", hotswap=True)


# --- hot-swaps ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("swap", [swap_with_function, swap_with_load_adapter])
def test_hot_swaps_of_any_rank_and_alpha_recompile_nothing(folders, swap):
    model = PeftModel.from_pretrained(tiny_llama(), folders[0])
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(logits(compiled), eager(folders[0]), **TOL)
    for folder, fields in zip(folders[1:], SWAPS[1:]):
        swap(compiled, folder)
        with no_recompile():
            out = logits(compiled)
        torch.testing.assert_close(out, eager(folder), **TOL)
        assert model.peft_config["default"].r == fields["r"]
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_training_step_keeps_its_graph_through_swaps(folders):
    model = PeftModel.from_pretrained(tiny_llama(), folders[0], is_trainable=True)
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    model.train()
    step = torch.compile(lambda: model(input_ids=IDS, labels=IDS).loss, backend="aot_eager", fullgraph=True)
    step().backward()
    for folder in folders[1:3]:
        model.load_adapter(folder, "default", hotswap=True, is_trainable=True)
        model.zero_grad()
        with no_recompile():
            loss = step()
        loss.backward()
        reference = PeftModel.from_pretrained(tiny_llama(), folder, is_trainable=True).train()
        torch.testing.assert_close(loss, reference(input_ids=IDS, labels=IDS).loss, **TOL)
    assert counters["stats"]["unique_graphs"] == 1


def test_preparing_keeps_outputs_and_rank_is_padded_with_zeros(folders):
    model = PeftModel.from_pretrained(tiny_llama(), folders[3])  # r=8, down_proj r=3
    before = logits(model)
    prepare_model_for_compiled_hotswap(model, target_rank=12)
    torch.testing.assert_close(logits(model), before, **TOL)
    layers = dict(model.adapter_layers())
    down = layers["model.layers.0.mlp.down_proj"]
    a, b = down.lora_A["default"].weight, down.lora_B["default"].weight
    assert a.shape == (12, 64) and b.shape == (32, 12)
    assert not a[3:].any() and not b[:, 3:].any()
    assert down.r["default"] == 3 and down.lora_A["default"].out_features == 12
    assert isinstance(down.scaling["default"], torch.Tensor) and down.scaling["default"].dim() == 0


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (tiny_llama, dict(target_modules="all-linear")),
        (tiny_llama, dict(target_modules=["q_proj", "v_proj"], use_dora=True, lora_dropout=0.1)),
        (tiny_plain, dict(target_modules=["embed", "conv", "fc1", "head"], rank_pattern={"conv": 2})),
    ],
    ids=["linear", "dora", "embedding-conv"],
)
def test_every_layer_kind_pads_computes_the_same_saves_its_own_rank_and_swaps(tmp_path, model, fields):
    first = save_lora(tmp_path / "first", seed=1, model=model, **fields)
    second = save_lora(tmp_path / "second", seed=2, model=model, **(fields | {"r": 2, "lora_alpha": 5}))
    loaded = PeftModel.from_pretrained(model(), first)
    before = logits(loaded)
    prepare_model_for_compiled_hotswap(loaded, target_rank=9)
    torch.testing.assert_close(logits(loaded), before, **TOL)
    loaded.save_pretrained(tmp_path / "again")
    assert_same_files(tmp_path / "again", first)
    hotswap_adapter(loaded, second)
    torch.testing.assert_close(logits(loaded), logits(PeftModel.from_pretrained(model(), second)), **TOL)
    loaded.save_pretrained(tmp_path / "swapped")
    assert_same_files(tmp_path / "swapped", second)


def assert_same_files(folder, expected):
    saved, wanted = (
        load_file(folder / "adapter_model.safetensors"),
        load_file(expected / "adapter_model.safetensors"),
    )
    assert saved.keys() == wanted.keys()
    for key, tensor in wanted.items():
        assert torch.equal(saved[key], tensor), key
    config = json.loads((folder / "adapter_config.json").read_text())
    wanted_config = json.loads((expected / "adapter_config.json").read_text())
    assert config == wanted_config


def test_a_swapped_in_adapter_saved_from_a_padded_model_loads_in_peft(tmp_path, folders):
    model = PeftModel.from_pretrained(tiny_llama(), folders[1])  # r=16
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    hotswap_adapter(model, folders[3])  # r=8, down_proj 3: held at rank 16
    model.save_pretrained(tmp_path / "saved")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    torch.testing.assert_close(logits(theirs), eager(folders[3]), **TOL)
    shapes = {
        key: tuple(t.shape) for key, t in load_file(tmp_path / "saved" / "adapter_model.safetensors").items()
    }
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (3, 64)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (32, 8)


def test_training_a_padded_adapter_matches_the_unpadded_one_and_keeps_the_padding_zero():
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    plain, padded = (peftkit.get_peft_model(tiny_llama(), config).train() for _ in range(2))
    prepare_model_for_compiled_hotswap(padded, target_rank=8)
    for model in (plain, padded):
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(input_ids=IDS, labels=IDS).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(logits(padded), logits(plain), **TOL)
    for (_, layer), (_, trained) in zip(padded.adapter_layers(), plain.adapter_layers()):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not a[4:].any() and not b[:, 4:].any()
        torch.testing.assert_close(a[:4], trained.lora_A["default"].weight, **TOL)


# --- what is refused -----------------------------------------------------------------------------------
@pytest.fixture
def loaded(folders):
    return PeftModel.from_pretrained(tiny_llama(), folders[0])


def test_a_compiled_model_is_refused_unless_told_otherwise(loaded):
    with pytest.raises(
        ValueError, match=r"already compiled.*Call it before torch.compile.*check_compiled='warn'"
    ):
        prepare_model_for_compiled_hotswap(torch.compile(loaded), target_rank=8)
    loaded.get_base_model().compile(backend="aot_eager")  # compiled in place, inside the PeftModel
    with pytest.raises(ValueError, match="already compiled"):
        prepare_model_for_compiled_hotswap(loaded, target_rank=8)
    assert all(layer.held_rank("default") == 4 for _, layer in loaded.adapter_layers())
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(loaded, target_rank=8, check_compiled="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_compiled_hotswap(loaded, target_rank=8, check_compiled="ignore")
    assert all(layer.held_rank("default") == 8 for _, layer in loaded.adapter_layers())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(check_compiled="raise"),
            r"check_compiled must be one of 'error', 'warn', 'ignore', got 'raise'",
        ),
        (dict(target_rank=0), r"target_rank must be a positive int.*got 0"),
        (dict(target_rank=True), r"target_rank must be a positive int.*got True"),
        (dict(target_rank="16"), r"target_rank must be a positive int.*got '16'"),
        (
            dict(target_rank=2),
            r"adapter 'default' holds rank 4 in 'model.layers.0.self_attn.q_proj', above target_rank=2",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(loaded, kwargs, message):
    before = logits(loaded)
    with pytest.raises(ValueError, match=message):
        prepare_model_for_compiled_hotswap(loaded, **kwargs)
    assert all(layer.held_rank("default") == 4 for _, layer in loaded.adapter_layers())
    assert all(isinstance(layer.scaling["default"], float) for _, layer in loaded.adapter_layers())
    assert torch.equal(logits(loaded), before)


def test_a_rank_above_the_target_is_refused_at_swap_time_and_changes_nothing(loaded, folders):
    prepare_model_for_compiled_hotswap(loaded, target_rank=8)
    before = logits(loaded)
    with pytest.raises(
        AdapterLoadError, match=r"has rank 16, above the rank 8 that .*target_rank=8\) padded"
    ):
        hotswap_adapter(loaded, folders[1])
    assert torch.equal(logits(loaded), before)
    assert loaded.peft_config["default"].r == 4


def test_without_preparation_another_rank_is_still_refused(loaded, folders):
    with pytest.raises(AdapterLoadError, match=r"LoraConfig\.r is 4 in the loaded adapter but 16"):
        hotswap_adapter(loaded, folders[1])


def test_a_model_whose_methods_cannot_be_prepared_and_other_objects_are_refused():
    ia3 = peftkit.get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"its methods \(ia3\) do not support it \(LoRA does\)"):
        prepare_model_for_compiled_hotswap(ia3, target_rank=8)
    with pytest.raises(TypeError, match="needs a peftkit PeftModel .* got LlamaForCausalLM"):
        prepare_model_for_compiled_hotswap(tiny_llama(), target_rank=8)


def test_configs_passed_get_the_target_rank_as_in_peft_but_the_models_own_keep_theirs(loaded):
    later = LoraConfig(r=4, rank_pattern={"q_proj": 2}, target_modules=TARGETS)
    also = {"x": LoraConfig(r=2, target_modules=TARGETS)}
    prepare_model_for_compiled_hotswap(loaded, target_rank=16, config=later)
    prepare_model_for_compiled_hotswap(loaded, target_rank=16, config=also | loaded.peft_config)
    assert (later.r, later.rank_pattern, also["x"].r) == (16, {"q_proj": 16}, 16)
    assert loaded.peft_config["default"].r == 4


# --- set_adapter ---------------------------------------------------------------------------------------
def two_adapters(prepare: bool):
    """Adapters "default" (r=4, alpha 8) and "other" (r=2, alpha 3) on a model in eval mode."""
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False))
    if prepare:
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    return model.eval()


def test_set_adapter_between_prepared_adapters_recompiles_nothing():
    model, reference = two_adapters(prepare=True), two_adapters(prepare=False)
    compiled = torch.compile(model, backend="aot_eager")
    logits(compiled)
    for name in ["other", "default", "other"]:
        model.set_adapter(name)
        reference.set_adapter(name)
        with no_recompile():
            out = logits(compiled)
        torch.testing.assert_close(out, logits(reference), **TOL)
    assert counters["stats"]["unique_graphs"] == 1


def test_set_adapter_in_a_compiled_training_step_recompiles_nothing():
    model = two_adapters(prepare=True).train()
    step = torch.compile(lambda: model(input_ids=IDS, labels=IDS).loss, backend="aot_eager", fullgraph=True)
    step().backward()
    for name in ["other", "default"]:
        model.set_adapter(name)
        model.zero_grad()
        with no_recompile():
            step().backward()
        trained = {n for n, p in model.named_parameters() if p.grad is not None}
        assert trained and all(f".{name}." in n for n in trained)
    assert counters["stats"]["unique_graphs"] == 1


def test_set_adapter_between_unprepared_adapters_of_one_rank_and_alpha_recompiles_nothing():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = peftkit.get_peft_model(tiny_llama(), config)
    torch.manual_seed(1)
    model.add_adapter("other", config)
    model.eval()
    compiled = torch.compile(model, backend="aot_eager")
    first = logits(compiled)
    model.set_adapter("other")
    with no_recompile():
        second = logits(compiled)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, logits(model), **TOL)  # the model itself runs eagerly


def test_unprepared_adapters_of_another_scale_recompile_on_set_adapter():
    """What preparing buys: a Python float scale is a constant of the graph."""
    compiled = torch.compile(two_adapters(prepare=False), backend="aot_eager")
    logits(compiled)
    compiled.set_adapter("other")
    logits(compiled)
    assert counters["stats"]["unique_graphs"] == 2


# --- mixed batches -------------------------------------------------------------------------------------
ROW_SETS = [
    ["default", "other", "__base__", "default"],
    ["other", "other", "other", "other"],
    ["__base__", "default", "default", "other"],
    ["__base__"] * 4,
]


def mixed_model():
    """Three adapters of different ranks; "third" only on q_proj, so other layers hold two."""
    model = two_adapters(prepare=False)
    model.add_adapter("third", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("where", ["peft_model", "base_model_in_place"])
def test_mixed_batches_naming_other_adapters_recompile_nothing(where):
    model, reference = mixed_model(), mixed_model()
    if where == "peft_model":
        run = torch.compile(model, backend="aot_eager")
    else:
        model.get_base_model().compile(backend="aot_eager", fullgraph=True)
        run = model
    ids = torch.randint(1, 128, (4, 5), generator=torch.Generator().manual_seed(1))
    for index, names in enumerate(ROW_SETS + [["third", "__base__", "other", "third"]]):
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=index > 0):
            out = run(input_ids=ids, adapter_names=names).logits
            expected = reference(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(out, expected, **TOL)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_fullgraph_compile_of_the_peft_model_says_to_compile_the_base_model_for_mixed_batches():
    compiled = torch.compile(mixed_model(), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"compile the base model in place instead: model.get_base_model\(\)"):
        compiled(input_ids=IDS, adapter_names=["default", "__base__"])


def test_a_hot_swap_reaches_the_compiled_mixed_batch(folders):
    model = PeftModel.from_pretrained(tiny_llama(), folders[0])
    model.load_adapter(folders[2], "other")
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    model.get_base_model().compile(backend="aot_eager", fullgraph=True)
    names = ["default", "other"]
    logits(model, adapter_names=names)
    hotswap_adapter(model, folders[1], adapter_name="other")
    with no_recompile():
        out = logits(model, adapter_names=names)
    reference = PeftModel.from_pretrained(tiny_llama(), folders[0])
    reference.load_adapter(folders[1], "other")
    torch.testing.assert_close(out, logits(reference, adapter_names=names), **TOL)


# --- inductor ------------------------------------------------------------------------------------------
def test_with_inductor_hot_swaps_set_adapter_and_mixed_batches_recompile_nothing(folders):
    model = PeftModel.from_pretrained(tiny_llama(), folders[0])
    model.load_adapter(folders[4], "other")  # r=6
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    compiled = torch.compile(model)
    torch.testing.assert_close(logits(compiled), eager(folders[0]), **TOL)
    for folder in folders[1:4]:
        hotswap_adapter(compiled, folder)
        with no_recompile():
            torch.testing.assert_close(logits(compiled), eager(folder), **TOL)
    model.set_adapter("other")
    with no_recompile():
        torch.testing.assert_close(logits(compiled), eager(folders[4]), **TOL)
    assert counters["stats"]["unique_graphs"] == 1
    # a mixed batch compiles the base model's graph for it once (the names are read outside), then reuses it
    reference = PeftModel.from_pretrained(tiny_llama(), folders[3])
    reference.load_adapter(folders[4], "other")
    for index, names in enumerate([["default", "other"], ["__base__", "default"], ["other", "other"]]):
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            out = logits(compiled, adapter_names=names)
        torch.testing.assert_close(out, logits(reference, adapter_names=names), **TOL)
    assert counters["stats"]["unique_graphs"] == 2


def test_layers_read_their_adapters_through_what_set_adapter_and_merging_keep_current():
    model = two_adapters(prepare=True)
    layer = next(layer for _, layer in model.adapter_layers() if isinstance(layer, LoraLayer))
    assert [a.lora_a for a in layer._pending] == [layer.lora_A["default"]]
    model.set_adapter(["default", "other"])
    assert [a.lora_a for a in layer._pending] == [layer.lora_A["default"], layer.lora_A["other"]]
    model.merge_adapter(["default"])
    assert [a.lora_a for a in layer._pending] == [layer.lora_A["other"]]
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert [a.lora_a for a in layer._pending] == [layer.lora_A["other"]]


@pytest.mark.parametrize("targets", [TARGETS, ["embed_tokens"]], ids=["linear", "embedding"])
def test_the_forward_reads_the_tensors_in_the_modules_at_each_call(targets):
    """What FSDP2 and torch.func rely on: tensors put in place of a parameter are the ones used."""
    config = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    model = peftkit.get_peft_model(tiny_llama(), config).eval()
    name, weight = next(
        (n, p) for n, p in model.named_parameters() if "lora_B" in n or "lora_embedding_B" in n
    )
    with torch.no_grad():
        substituted = torch.func.functional_call(model, {name: weight * 3}, kwargs={"input_ids": IDS}).logits
        weight.mul_(3)
        expected = logits(model)
    torch.testing.assert_close(substituted, expected, rtol=0, atol=0)
