"""Rank allocation: PEFT's RankAllocator semantics, checked against formulas written out here."""

from __future__ import annotations

import copy
import json
import math

import peftkit
import pytest
import torch
from adalora_helpers import batch, logits, train
from peftkit.testing.models import tiny_llama
from peftkit_adalora import AdaLoraConfig, AdaLoraLayer
from peftkit_adalora.allocation import budget_schedule, mask_to_budget, triplet_scores, update_importance
from safetensors.torch import load_file

RUN = dict(total_step=20, tinit=2, tfinal=4, deltaT=2, init_r=6, target_r=2)
TARGETS = ["q_proj", "v_proj"]  # 2 layers of tiny_llama: 4 adapted modules


def cubic_budget(step, b0, bT, tinit, final_step):
    """The paper's schedule, floored as PEFT floors it."""
    if step <= tinit:
        return b0
    if step >= final_step:
        return bT
    progress = (step - tinit) / (final_step - tinit)
    return math.floor(bT + (b0 - bT) * (1 - progress) ** 3)


def test_budget_schedule_is_the_cubic_from_initial_to_target():
    config = AdaLoraConfig(total_step=50, tinit=5, tfinal=10, deltaT=3, init_r=12, target_r=4)
    b0, bT = 12 * 7, 4 * 7
    for step in range(55):
        budget, prune = budget_schedule(step, config, b0, bT)
        assert budget == cubic_budget(step, b0, bT, 5, 40), step
        assert prune == (step > 40 or (5 < step <= 40 and step % 3 == 0)), step
    assert [budget_schedule(s, config, b0, bT)[0] for s in (0, 5, 6, 40, 41)] == [
        84,
        84,
        79,
        28,
        28,
    ]  # 28 + 56 · (34/35)³ = 79.3


def _adalora_layers(model):
    return [(path, layer) for path, layer in model.adapter_layers() if isinstance(layer, AdaLoraLayer)]


def test_a_short_run_prunes_ranks_and_the_saved_config_records_them(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    model = peftkit.get_peft_model(base, AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **RUN))
    config = model.peft_config["default"]
    b0, bT, final_step = 6 * 4, 2 * 4, 20 - 4
    kept_per_step = {}

    def record(step):
        pattern = config.rank_pattern
        kept_per_step[step] = None if pattern is None else sum(sum(mask) for mask in pattern.values())

    train(model, RUN["total_step"], on_step=record)

    prune_steps = [s for s in range(20) if 2 < s < final_step and s % 2 == 0] + [final_step]
    assert prune_steps == [4, 6, 8, 10, 12, 14, 16]
    assert all(kept_per_step[s] is None for s in range(4))
    for step in prune_steps:
        assert kept_per_step[step] == cubic_budget(step, b0, bT, 2, final_step), step
    for step in range(5, 20):  # between prunings the pattern stays
        if step not in prune_steps:
            assert kept_per_step[step] == kept_per_step[step - 1], step
    assert kept_per_step[19] == bT

    # pruned singular values are zero, kept ones are not; the ranks now differ between modules
    ranks = {}
    for path, layer in _adalora_layers(model):
        mask = torch.tensor(config.rank_pattern[f"{path}.lora_E"])
        singular_values = layer.lora_E["default"].detach().view(-1)
        assert torch.all(singular_values[~mask] == 0) and torch.all(singular_values[mask] != 0)
        ranks[path] = int(mask.sum())
    assert sum(ranks.values()) == bT and len(set(ranks.values())) > 1

    expected = logits(model)
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["rank_pattern"] == config.rank_pattern
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for path, rank in ranks.items():
        key = f"base_model.model.{path}"
        assert tensors[f"{key}.lora_A"].shape == (rank, 32)
        assert tensors[f"{key}.lora_E"].shape == (rank, 1)
        assert tensors[f"{key}.lora_B"].shape[1] == rank

    loaded = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    assert {path: layer.r["default"] for path, layer in _adalora_layers(loaded)} == ranks
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)


def _one_layer_model(init_r=3):
    model = peftkit.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(4, 5)),
        AdaLoraConfig(target_modules=["0"], init_r=init_r, target_r=1, total_step=10, beta1=0.5, beta2=0.75),
    )
    return model, model.base_model.model[0]


def test_importance_is_the_smoothed_sensitivity_times_its_uncertainty():
    model, layer = _one_layer_model()
    generator = torch.Generator().manual_seed(0)
    tensors = {name: getattr(layer, name)["default"] for name in ("lora_A", "lora_E", "lora_B")}
    smoothed = {name: torch.zeros_like(p) for name, p in tensors.items()}
    spread = {name: torch.zeros_like(p) for name, p in tensors.items()}
    for _ in range(3):
        for name, param in tensors.items():
            param.data = torch.randn(param.shape, generator=generator)
            param.grad = torch.randn(param.shape, generator=generator)
            now = (param.data * param.grad).abs()
            smoothed[name] = 0.5 * smoothed[name] + 0.5 * now
            spread[name] = 0.75 * spread[name] + 0.25 * (now - smoothed[name]).abs()
        update_importance([("0", layer)], "default", beta1=0.5, beta2=0.75)
    for name in tensors:
        torch.testing.assert_close(layer.sensitivity["default"][name], smoothed[name])
        torch.testing.assert_close(layer.uncertainty["default"][name], spread[name])

    score = {name: smoothed[name] * spread[name] for name in tensors}
    expected = torch.stack(
        [score["lora_E"][i, 0] + score["lora_A"][i].mean() + score["lora_B"][:, i].mean() for i in range(3)]
    )
    torch.testing.assert_close(triplet_scores(layer, "default"), expected)


def test_masking_keeps_the_budget_of_highest_scored_triplets_across_modules():
    model, layer = _one_layer_model(init_r=4)
    other = copy.deepcopy(layer)
    layers = [("a", layer), ("b", other)]
    # scores (all entries of a tensor alike): E gives the triplet's score, A and B add 0
    for (_, each), scores in zip(layers, ([4.0, 0.5, 3.0, 1.0], [2.0, 5.0, 0.25, 6.0])):
        each.sensitivity["default"] = {
            "lora_E": torch.tensor(scores).view(4, 1),
            "lora_A": torch.zeros(4, 4),
            "lora_B": torch.zeros(5, 4),
        }
        each.uncertainty["default"] = {
            name: torch.ones_like(t) for name, t in each.sensitivity["default"].items()
        }
        each.lora_E["default"].data.fill_(1.0)
    pattern = mask_to_budget(layers, "default", budget=5, initial_budget=8)
    assert pattern == {"a.lora_E": [True, False, True, False], "b.lora_E": [True, True, False, True]}
    assert layer.lora_E["default"].view(-1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert other.lora_E["default"].view(-1).tolist() == [1.0, 1.0, 0.0, 1.0]


def test_pruned_singular_values_are_zeroed_again_after_the_final_allocation():
    model = peftkit.get_peft_model(
        tiny_llama(), AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **RUN)
    )
    train(model, 17)  # through the final allocation at step 16
    pattern = model.peft_config["default"].rank_pattern
    path, layer = _adalora_layers(model)[0]
    pruned = ~torch.tensor(pattern[f"{path}.lora_E"])
    layer.lora_E["default"].data.fill_(0.5)  # as an optimizer step might revive them
    model.update_and_allocate(17)
    assert torch.all(layer.lora_E["default"].view(-1)[pruned] == 0)
    assert model.peft_config["default"].rank_pattern == pattern  # the ranks are final


def test_update_and_allocate_needs_the_gradients():
    model = peftkit.get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    with pytest.raises(
        RuntimeError, match=r"has no gradient; call update_and_allocate\(step\) after loss.backward"
    ):
        model.update_and_allocate(0)


def test_an_adapter_loaded_at_its_pruned_ranks_does_not_allocate_again(tmp_path):
    model = peftkit.get_peft_model(
        tiny_llama(), AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **RUN)
    )
    train(model, 17)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    inputs = batch()
    loaded(**inputs, labels=inputs["input_ids"]).loss.backward()
    with pytest.raises(RuntimeError, match="was created at the ranks of its config's rank_pattern"):
        loaded.update_and_allocate(3)
    loaded.update_and_allocate(18)  # past the allocation: nothing to do, the ranks are final


def test_only_the_trainable_adapter_allocates():
    model = peftkit.get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    model.add_adapter("frozen", AdaLoraConfig(target_modules=["v_proj"], total_step=5, inference_mode=True))
    inputs = batch()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    model.update_and_allocate(0)
    frozen = [layer for _, layer in model.adapter_layers() if layer.holds("frozen")]
    assert frozen and all("frozen" not in layer.sensitivity for layer in frozen)
    assert all(
        "default" in layer.sensitivity for _, layer in model.adapter_layers() if layer.holds("default")
    )


def test_allocation_errors_say_how_to_call_update_and_allocate():
    config = AdaLoraConfig(target_modules=["q_proj"], total_step=6, tfinal=2)
    model = peftkit.get_peft_model(tiny_llama(), config)
    inputs = batch()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with pytest.raises(RuntimeError, match="step 5 is past the allocation .* but no ranks were allocated"):
        model.update_and_allocate(5)
    with pytest.raises(RuntimeError, match="no importance scores to prune by"):
        model.update_and_allocate(4)  # the final allocation, with no step scored before it


def test_saving_refuses_a_rank_pattern_that_does_not_fit_the_layers(tmp_path):
    config = AdaLoraConfig(
        target_modules=["q_proj"],
        total_step=6,
        init_r=2,
        target_r=1,
    )
    model = peftkit.get_peft_model(tiny_llama(), config)
    live = model.peft_config["default"]
    live.rank_pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False]}
    model.save_pretrained(tmp_path / "cut")  # full-rank layer: cut to the kept triplet
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "cut")
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 1
    loaded.peft_config["default"].rank_pattern = {"model.layers.0.self_attn.q_proj.lora_E": [False, False]}
    with pytest.raises(ValueError, match="has rank 1, but its config's rank_pattern keeps 0 of 2 triplets"):
        loaded.save_pretrained(tmp_path / "again")
