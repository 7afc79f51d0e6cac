"""Mixed batches: ``model(..., adapter_names=[...])`` runs each row with its own adapter, as PEFT does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import AdapterLayer, IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.mixed_batch import RowAdapters
from peftkit.testing.models import tiny_llama
from peftkit_lora.layer import LoraLayer

NAMES = ["default", "small", "__base__"]


def two_lora_llama():
    model = get_peft_model(
        tiny_llama(seed=0), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.add_adapter(
        "small", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return model.eval()


def one_row_at_a_time(model, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The reference: each row alone, with its adapter active (or the adapters off)."""
    logits = []
    for row, name in zip(ids, names):
        if name == "__base__":
            with model.disable_adapter():
                logits.append(model(input_ids=row[None]).logits)
        else:
            model.set_adapter(name)
            logits.append(model(input_ids=row[None]).logits)
    return torch.cat(logits)


@pytest.fixture(scope="module")
def model():
    return two_lora_llama()


@settings(max_examples=20, deadline=None)
@given(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=6), length=st.integers(1, 6))
def test_each_row_gets_its_own_adapter(model, names, length):
    ids = torch.randint(
        1, 128, (len(names), length), generator=torch.Generator().manual_seed(len(names) + length)
    )
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        expected = one_row_at_a_time(model, ids, names)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_the_grouped_lora_path_equals_running_each_adapter_on_its_rows(model, monkeypatch):
    ids = torch.randint(1, 128, (6, 5), generator=torch.Generator().manual_seed(0))
    names = ["small", "default", "default", "__base__", "small", "default"]
    with torch.no_grad():
        grouped = model(input_ids=ids, adapter_names=names).logits
        monkeypatch.setattr(LoraLayer, "mixed_batch_output", AdapterLayer.mixed_batch_output)
        looped = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("names", "length", "way"),
    [
        (["default", "default", "small", "small"], 3, "in order"),  # q_proj and v_proj hold both: a view
        (["small", "default", "__base__", "default"], 6, "by row"),  # 6 tokens a row, rank 4: weights by row
        (["small", "default", "__base__", "default"], 2, "grouped"),  # 2 tokens a row: tokens grouped
    ],
)
def test_each_way_of_running_lora_rows_gives_each_row_its_own_adapter(model, monkeypatch, names, length, way):
    ways = []
    grouping, by_row = RowAdapters.grouping, LoraLayer._mixed_batch_by_row

    def spy_grouping(self, *args):
        result = grouping(self, *args)
        ways.append("in order" if result.in_order else "grouped")
        return result

    def spy_by_row(self, *args):
        ways[-1] = "by row"
        return by_row(self, *args)

    monkeypatch.setattr(RowAdapters, "grouping", spy_grouping)
    monkeypatch.setattr(LoraLayer, "_mixed_batch_by_row", spy_by_row)
    ids = torch.randint(1, 128, (len(names), length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        monkeypatch.undo()
        expected = one_row_at_a_time(model, ids, names)
    assert way in ways
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


WAYS = [  # (names, tokens a row): in order, by row, grouped (as above)
    (["default", "default", "small", "small"], 3),
    (["small", "default", "__base__", "default"], 6),
    (["small", "default", "__base__", "default"], 2),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("names", "length"), WAYS, ids=["in_order", "by_row", "grouped"])
def test_each_way_runs_under_autocast_close_to_float32(model, names, length, dtype):
    ids = torch.randint(1, 128, (len(names), length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
        with torch.autocast("cpu", dtype=dtype):
            got = model(input_ids=ids, adapter_names=names).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_lora_rows_run_without_a_loop_over_adapters(model, monkeypatch):
    """The grouped path never falls back to running adapters one by one."""

    def refuse(*args, **kwargs):
        raise AssertionError("adapter_output was called: the mixed batch looped over adapters")

    monkeypatch.setattr(LoraLayer, "adapter_output", refuse)
    ids = torch.randint(1, 128, (4, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["default", "small", "small", "__base__"])


def test_the_stacked_weights_follow_changes_to_an_adapter(model):
    ids = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(2))
    names = ["small", "default"]
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=names).logits
        layer.lora_B["small"].weight.mul_(3)
        after = model(input_ids=ids, adapter_names=names).logits
        expected = one_row_at_a_time(model, ids, names)
        layer.lora_B["small"].weight.div_(3)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_lora_and_ia3_rows_mix():
    model = get_peft_model(
        tiny_llama(seed=1), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter(
        "scale",
        IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    )
    model.eval()
    ids = torch.randint(1, 128, (3, 4), generator=torch.Generator().manual_seed(3))
    names = ["scale", "default", "__base__"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, adapter_names=names).logits,
            one_row_at_a_time(model, ids, names),
            rtol=1e-5,
            atol=1e-5,
        )


def test_generate_takes_adapter_names(model):
    ids = torch.randint(1, 128, (3, 4), generator=torch.Generator().manual_seed(4))
    names = ["default", "__base__", "small"]
    mixed = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False)
    for row, name in zip(range(3), names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[row : row + 1], max_new_tokens=4, do_sample=False)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[row : row + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(mixed[row], alone[0])


def test_a_name_per_row_is_required(model):
    ids = torch.randint(1, 128, (3, 4))
    with pytest.raises(ValueError, match="adapter_names has 2 names, but .* batch of 3 rows"):
        model(input_ids=ids, adapter_names=["default", "small"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(input_ids=ids, adapter_names="default")


def test_unknown_names_are_refused(model):
    with pytest.raises(Exception, match="no adapter named 'nope'"):
        model(input_ids=torch.ones(1, 2, dtype=torch.long), adapter_names=["nope"])


def test_merged_adapters_and_prompts_are_refused():
    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="'prompt' is a prompt_tuning adapter"):
        model(input_ids=ids, adapter_names=["prompt", "default"])
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match=r"while adapters are merged \(default\)"):
        model(input_ids=ids, adapter_names=["default", "__base__"])


def test_heads_disabled_adapters_and_training_dropout_are_refused():
    from peftkit.testing.models import tiny_llama as llama

    with_head = get_peft_model(
        llama(seed=0, num_labels=2), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"])
    )
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="'default' has modules_to_save"):
        with_head(input_ids=ids, adapter_names=["default", "__base__"])

    model = get_peft_model(
        llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1)
    ).train()
    with pytest.raises(ValueError, match="runs LoRA without dropout: call model.eval()"):
        model(input_ids=ids, adapter_names=["default", "__base__"])
    with model.disable_adapter(), pytest.raises(ValueError, match="inside disable_adapter"):
        model(input_ids=ids, adapter_names=["default", "__base__"])


def test_an_adapter_deleted_and_added_again_elsewhere_is_seen_by_the_next_mixed_batch():
    # the layers a mixed batch reaches were cached by adapter names, which deleting "small" and adding it
    # again on other modules does not change: its new k_proj layers then went unseen, and "default" rows
    # picked up its change
    model = get_peft_model(
        tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter("small", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.eval()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["default", "small"])
        model.delete_adapter("small")
        model.add_adapter("small", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
        mixed = model(input_ids=ids, adapter_names=["default", "small"]).logits
        expected = one_row_at_a_time(model, ids, ["default", "small"])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
