"""Composition blocks with LoRA: an Average of LoRA adapters is their weighted ``cat`` combination
(``add_weighted_adapter``), and the blocks hold on LoRA's other layers (embeddings, convolutions,
transformers' Conv1D) and on DoRA. References are single adapters or the ``cat`` adapter, never a block."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import Average, BatchSplit, MultiTask, Parallel, PromptTuningConfig, Stack, get_peft_model
from peftkit.testing.models import randomize_trainable, tiny_gpt2, tiny_llama, tiny_plain
from peftkit_lora import LoraConfig

# also run under torch's generic CPU kernels (dev.sh); tiny models: one intra-op thread
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("peftkit_one_thread")]

TOL = dict(rtol=1e-5, atol=1e-5)


# each model with the modules an adapter may target, embeddings and convolutions included
MODELS = {
    "llama": (
        tiny_llama,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
    ),
    "plain": (tiny_plain, ["embed", "conv", "fc1", "fc2", "head"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"]),
}


@pytest.fixture(scope="module")
def bases():
    return {name: build() for name, (build, _) in MODELS.items()}


def ids(rows: int = 3, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def output(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def alone(model, adapters, input_ids) -> torch.Tensor:
    model.set_adapter(adapters)
    return output(model, input_ids)


def with_adapters(base, configs: dict[str, LoraConfig]):
    """A copy of ``base`` with trained-looking LoRA adapters (A and B both random)."""
    names = list(configs)
    model = get_peft_model(copy.deepcopy(base), configs[names[0]], names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    for seed, name in enumerate(names):
        model.set_adapter(name)
        randomize_trainable(model, seed=seed + 2, scale=0.2)
    return model.eval()


@st.composite
def lora_configs(draw, modules: list[str]):
    targets = draw(st.lists(st.sampled_from(modules), min_size=1, max_size=3, unique=True))
    return LoraConfig(
        r=draw(st.integers(1, 4)),
        lora_alpha=draw(st.sampled_from([1, 4, 7])),
        use_rslora=draw(st.booleans()),
        target_modules=sorted(targets),
        init_lora_weights=False,
    )


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(MODELS)),
    data=st.data(),
    weights=st.lists(st.floats(0.05, 3.0), min_size=2, max_size=2),
    normalize=st.booleans(),
)
def test_average_is_add_weighted_adapter_cat(bases, kind, data, weights, normalize):
    modules = MODELS[kind][1]
    first, second = data.draw(lora_configs(modules)), data.draw(lora_configs(modules))
    model = with_adapters(bases[kind], {"a": first, "b": second})
    x = ids(seed=len(weights))
    # the reference: one LoRA adapter holding both, each scaled by its weight (an adapter a layer lacks adds 0)
    applied = [w / sum(weights) for w in weights] if normalize else weights
    model.add_weighted_adapter(["a", "b"], applied, "cat", combination_type="cat")
    expected = alone(model, "cat", x)
    model.set_adapter(Average("a", "b", weights=weights, normalize_weights=normalize))
    torch.testing.assert_close(output(model, x), expected, **TOL)


@pytest.fixture(scope="module")
def llama3(bases):
    return with_adapters(
        bases["llama"],
        {
            "a": LoraConfig(
                r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False
            ),
            "b": LoraConfig(
                r=2, lora_alpha=5, target_modules=["v_proj", "down_proj"], init_lora_weights=False
            ),
            "c": LoraConfig(r=3, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False),
        },
    )


def test_an_average_of_a_stack_is_cat_with_the_stacks_weight_on_each_of_its_adapters(llama3):
    x = ids(seed=1)
    llama3.add_weighted_adapter(["a", "b", "c"], [0.25, 0.25, 0.75], "cat_abc", combination_type="cat")
    try:
        expected = alone(llama3, "cat_abc", x)
    finally:
        llama3.delete_adapter("cat_abc")
    llama3.set_adapter(Average(Stack("a", "b"), "c", weights=[1, 3]))
    torch.testing.assert_close(output(llama3, x), expected, **TOL)


def test_an_average_inside_batch_split_runs_on_its_rows(llama3):
    x = ids(rows=4, seed=2)
    llama3.add_weighted_adapter(["a", "c"], [0.5, 0.5], "cat_ac", combination_type="cat")
    try:
        averaged = alone(llama3, "cat_ac", x)
    finally:
        llama3.delete_adapter("cat_ac")
    only_b = alone(llama3, "b", x)
    llama3.set_adapter(BatchSplit("b", Average("a", "c"), batch_sizes=[1, 3]))
    out = output(llama3, x)
    torch.testing.assert_close(out[:1], only_b[:1], **TOL)
    torch.testing.assert_close(out[1:], averaged[1:], **TOL)


def test_a_prompt_stacked_with_an_average_is_the_prompt_with_their_cat(bases):
    model = with_adapters(
        bases["llama"],
        {
            "a": LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "b": LoraConfig(r=3, target_modules=["v_proj", "up_proj"], init_lora_weights=False),
        },
    )
    model.add_adapter("p", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    x = ids(rows=2, seed=7)
    model.add_weighted_adapter(["a", "b"], [0.75, 0.25], "cat", combination_type="cat")
    expected = alone(model, ["p", "cat"], x)
    model.set_adapter(Stack("p", Average("a", "b", weights=[3, 1])))
    torch.testing.assert_close(output(model, x), expected, **TOL)


@pytest.mark.parametrize(
    "block, rows",
    [
        (BatchSplit("c", "a", "b", batch_sizes=[2, 1, 1]), ["c", "c", "a", "b"]),
        (MultiTask("a", "b", "c"), ["c", "a", "c", "b"]),
    ],
    ids=["BatchSplit", "MultiTask"],
)
def test_row_blocks_over_an_embedding_target_give_each_row_its_adapter(llama3, block, rows):
    """'a' and 'c' adapt the embedding, whose rows take LoRA's grouped mixed-batch path."""
    x = ids(rows=4, seed=3)
    reference = {name: alone(llama3, name, x) for name in "abc"}
    llama3.set_adapter(block)
    task_ids = rows if isinstance(block, MultiTask) else None
    with torch.no_grad():
        out = llama3(input_ids=x, task_ids=task_ids).logits
    for row, name in enumerate(rows):
        torch.testing.assert_close(out[row], reference[name][row], **TOL)


def test_row_blocks_over_a_convolution(bases):
    model = with_adapters(
        bases["plain"],
        {
            "a": LoraConfig(r=2, target_modules=["conv", "fc1"], init_lora_weights=False),
            "b": LoraConfig(r=3, target_modules=["conv", "embed"], init_lora_weights=False),
        },
    )
    x = ids(rows=3, seed=4)
    first, second = alone(model, "a", x), alone(model, "b", x)
    model.set_adapter(BatchSplit("a", "b", batch_sizes=[2, 1]))
    out = output(model, x)
    torch.testing.assert_close(out[:2], first[:2], **TOL)
    torch.testing.assert_close(out[2:], second[2:], **TOL)
    model.set_adapter(Parallel("b", "a"))
    out = output(model, x)
    torch.testing.assert_close(out, torch.cat([second, first]), **TOL)


# --- DoRA: its output is not linear in the adapter's delta, so the references are outputs, not cat ------------
def dora_one_layer():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 6))
    return with_adapters(
        base,
        {
            "a": LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False),
            "b": LoraConfig(r=3, target_modules=["0"], init_lora_weights=False),
        },
    )


def test_dora_inside_average_weighs_its_output():
    model = dora_one_layer()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.set_adapter("a")
        ya = model(x)
        model.set_adapter("b")
        yb = model(x)
        model.set_adapter(Average("a", "b", weights=[2, 1]))
        torch.testing.assert_close(model(x), (2 * ya + yb) / 3, **TOL)


def test_dora_inside_batch_split_and_parallel_on_llama(bases):
    model = with_adapters(
        bases["llama"],
        {
            "dora": LoraConfig(
                r=2, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False
            ),
            "plain": LoraConfig(r=2, target_modules=["v_proj", "up_proj"], init_lora_weights=False),
        },
    )
    x = ids(rows=3, seed=6)
    dora, plain = alone(model, "dora", x), alone(model, "plain", x)
    model.set_adapter(BatchSplit("plain", "dora", batch_sizes=[1, 2]))
    out = output(model, x)
    torch.testing.assert_close(out[:1], plain[:1], **TOL)
    torch.testing.assert_close(out[1:], dora[1:], **TOL)
    model.set_adapter(Parallel("dora", "plain"))
    torch.testing.assert_close(output(model, x), torch.cat([dora, plain]), **TOL)


@pytest.mark.parametrize(
    "block",
    [BatchSplit("a", "b", batch_sizes=[2, 2]), MultiTask("a", "b")],
    ids=["batch_split", "multi_task"],
)
def test_training_through_row_blocks_gives_each_adapter_the_gradients_of_its_own_rows(block):
    # LoRA's row paths add into the base output in place wherever no graph records it (the first layers,
    # whose input needs no gradient): the gradients must be those of each adapter run on its own rows
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a"
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    x = ids(4, length=8, seed=11)
    tasks = {"task_ids": [0, 0, 1, 1]} if isinstance(block, MultiTask) else {}
    model.set_adapter(block)
    model.train()
    out = model(input_ids=x, **tasks).logits
    out.pow(2).mean().backward()
    composed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for name, rows in (("a", slice(0, 2)), ("b", slice(2, 4))):
        model.set_adapter(name)
        model(input_ids=x[rows]).logits.pow(2).sum().div(out.numel()).backward()
    separate = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert (
        composed.keys() == separate.keys() and len(separate) == 2 * 7 * 2 * 2
    )  # A and B, 7 targets, 2 layers
    for name, grad in separate.items():
        torch.testing.assert_close(composed[name], grad, rtol=1e-4, atol=1e-7)
