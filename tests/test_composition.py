"""Composition blocks (``peftkit.composition``): AdapterHub's Stack, Average, Split, BatchSplit, MultiTask and
Parallel, checked against references built from single adapters (``set_adapter(name)`` or a list of names,
the base model, hand-weighted sums), never against what a block produced before."""

from __future__ import annotations

import json

import peftkit
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import (
    AdaLoraConfig,
    AdapterNameError,
    Average,
    BatchSplit,
    ConfigError,
    Fuse,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MergeNotSupportedError,
    MultiTask,
    Parallel,
    PromptTuningConfig,
    Split,
    Stack,
    get_peft_model,
    method_impl,
    plugins,
)
from peftkit.composition import ALLOWED_NESTINGS, CompositionBlock, validate
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_llama, tiny_plain

TOL = dict(rtol=1e-5, atol=1e-5)


# tiny models: one intra-op thread (see peftkit.testing.pytest_plugin)
pytestmark = pytest.mark.usefixtures("peftkit_one_thread")


def ids(rows: int, length: int = 5, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def alone(model, adapters, input_ids, **kwargs) -> torch.Tensor:
    """The reference: the model with ``adapters`` (a name, or names all active) set the plain way."""
    model.set_adapter(adapters)
    return logits(model, input_ids, **kwargs)


def three_lora_llama():
    """LoRA adapters that differ in rank, scaling and target modules."""
    model = get_peft_model(
        tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a"
    )
    model.add_adapter(
        "b",
        LoraConfig(
            r=2, lora_alpha=5, target_modules=["k_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    model.add_adapter("c", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return three_lora_llama()


class PerToken(torch.nn.Module):
    """Tokens that never interact: an embedding and an MLP on each token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(input_ids))))


@pytest.fixture(scope="module")
def per_token():
    model = get_peft_model(
        PerToken(), LoraConfig(r=2, target_modules=["embed", "up"], init_lora_weights=False), "a"
    )
    model.add_adapter("b", LoraConfig(r=3, target_modules=["up", "down"], init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=1, target_modules=["down"], init_lora_weights=False))
    return model.eval()


def test_the_references_differ_so_that_no_check_below_holds_by_accident(llama, per_token):
    for model, x in ((llama, ids(2)), (per_token, ids(2, vocab=50))):
        outputs = [alone(model, name, x) for name in "abc"]
        model.set_adapter("a")
        with model.disable_adapter():
            outputs.append(logits(model, x))
        for i in range(len(outputs)):
            for j in range(i):
                assert not torch.allclose(outputs[i], outputs[j], rtol=1e-3, atol=1e-3)


# --- the blocks as values ----------------------------------------------------------------------------------
def test_the_blocks_are_importable_from_peftkit():
    from peftkit import composition

    for name in ("Stack", "Average", "Split", "BatchSplit", "MultiTask", "Parallel", "Fuse"):
        assert getattr(peftkit, name) is getattr(composition, name)
        assert issubclass(getattr(peftkit, name), CompositionBlock)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Stack(), r"Stack needs at least one adapter name or block"),
        (lambda: Average("a", 3), r"takes adapter names \(str\) and composition blocks, got int 3"),
        (lambda: Parallel("a", ["b"]), r"got list \['b'\]"),
        (
            lambda: Split("a", "b", splits=[2]),
            r"Split\(splits=\.\.\.\) takes one non-negative int per child \(2\)",
        ),
        (lambda: Split("a", "b", splits=[2, 1.5]), r"got \[2, 1\.5\]"),
        (
            lambda: BatchSplit("a", "b", batch_sizes=[1, -1]),
            r"BatchSplit\(batch_sizes=\.\.\.\).*got \[1, -1\]",
        ),
        (lambda: Average("a", "b", weights=[1.0, -1.0]), r"sums to 0 and cannot be normalised"),
        (lambda: Average("a", "b", weights=[1.0]), r"one number per child \(2\)"),
    ],
)
def test_a_malformed_block_says_what_is_wrong(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_weights_are_normalised_unless_told_not_to_and_one_size_serves_every_child():
    assert Average("a", "b", "c").weights == pytest.approx([1 / 3] * 3)
    assert Average("a", "b", weights=[1, 3]).weights == [0.25, 0.75]
    assert Average("a", "b", weights=[1, 3], normalize_weights=False).weights == [1.0, 3.0]
    assert Average("a", "b", weights=[1.0, -1.0], normalize_weights=False).weights == [1.0, -1.0]
    assert BatchSplit("a", "b", batch_sizes=2).batch_sizes == [2, 2]
    assert Split("a", "b", "c", splits=4).splits == [4, 4, 4]


def test_to_dict_writes_adapterhubs_json_shape():
    block = Stack("a", BatchSplit("b", Average("c", "d", weights=[1, 3]), batch_sizes=[1, 2]))
    assert block.to_dict() == {
        "type": "Stack",
        "children": [
            {"type": "single", "children": ["a"]},
            {
                "type": "BatchSplit",
                "children": [
                    {"type": "single", "children": ["b"]},
                    {
                        "type": "Average",
                        "children": [
                            {"type": "single", "children": ["c"]},
                            {"type": "single", "children": ["d"]},
                        ],
                        "kwargs": {"weights": [0.25, 0.75]},
                    },
                ],
                "kwargs": {"batch_sizes": [1, 2]},
            },
        ],
    }
    assert CompositionBlock.from_dict(json.loads(json.dumps(block.to_dict()))) == block
    # AdapterHub writes a fusion's name only when given one
    assert Fuse("a", "b").to_dict() == {
        "type": "Fuse",
        "children": [{"type": "single", "children": ["a"]}, {"type": "single", "children": ["b"]}],
    }
    assert Fuse("a", "b", name="ab").to_dict()["kwargs"] == {"name": "ab"}


def test_from_dict_names_an_unknown_block_type():
    with pytest.raises(ConfigError, match=r"unknown composition block type 'Blend'"):
        CompositionBlock.from_dict({"type": "Blend", "children": [{"type": "single", "children": ["a"]}]})


NAMES = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def blocks(draw, depth: int = 2):
    kind = draw(st.sampled_from(["Stack", "Parallel", "MultiTask", "Fuse", "Split", "BatchSplit", "Average"]))
    child = NAMES if depth == 0 else st.one_of(NAMES, blocks(depth=depth - 1))
    children = draw(st.lists(child, min_size=1, max_size=3))
    count = len(children)
    if kind in ("Split", "BatchSplit"):
        sizes = draw(
            st.one_of(st.integers(0, 4), st.lists(st.integers(0, 4), min_size=count, max_size=count))
        )
        return getattr(peftkit, kind)(*children, **{"splits" if kind == "Split" else "batch_sizes": sizes})
    if kind == "Average":
        weights = draw(st.one_of(st.none(), st.lists(st.floats(0.01, 10), min_size=count, max_size=count)))
        normalize = draw(st.booleans())
        return Average(*children, weights=weights, normalize_weights=normalize)
    if kind == "Fuse":
        return Fuse(*children, name=draw(st.one_of(st.none(), st.just("fusion"))))
    return getattr(peftkit, kind)(*children)


@settings(max_examples=60, deadline=None)
@given(block=blocks())
def test_to_dict_and_from_dict_round_trip(block):
    data = block.to_dict()
    back = CompositionBlock.from_dict(json.loads(json.dumps(data)))
    assert back == block
    assert back.to_dict() == data
    assert back.flatten() == block.flatten()


# --- nesting -----------------------------------------------------------------------------------------------
def test_allowed_nestings_are_adapterhubs():
    # adapters 1.x (src/adapters/composition.py), str standing for an adapter name
    assert ALLOWED_NESTINGS == {
        Stack: [str, Fuse, Split, Parallel, BatchSplit, Average, MultiTask],
        Fuse: [str, Stack],
        Split: [str, Split, Stack, BatchSplit, Average],
        Parallel: [str, Stack, BatchSplit, Average],
        MultiTask: [str, Stack, Average, Fuse],
        BatchSplit: [str, Stack, Split, BatchSplit, Average],
        Average: [str, Stack, Split, BatchSplit],
    }


@pytest.mark.parametrize(
    "block, message",
    [
        (
            Average(Fuse("a", "b"), "c"),
            r"Fuse cannot go inside Average .*Average holds str, Stack, Split, BatchSplit",
        ),
        (Fuse(Parallel("a", "b"), "c"), r"Parallel cannot go inside Fuse .*Fuse holds str, Stack"),
        (Parallel(MultiTask("a", "b"), "c"), r"MultiTask cannot go inside Parallel"),
        (Split(Parallel("a", "b"), "c", splits=1), r"Parallel cannot go inside Split"),
        (Average(Average("a", "b"), "c"), r"Average cannot go inside Average"),
        (
            Stack("a", BatchSplit(Average("b", "c"), "d", batch_sizes=1)),
            r"composition too deep: Average\('b', 'c'.*sits 2 blocks down, where only adapter names and Stack",
        ),
        (Split(Stack("a", BatchSplit("b", "c", batch_sizes=1)), "d", splits=1), r"composition too deep"),
        (Stack(Stack("a", "b"), "c"), r"Stack cannot go inside Stack"),
    ],
)
def test_validate_refuses_what_adapterhub_refuses(block, message):
    with pytest.raises(ConfigError, match=message):
        validate(block)


@pytest.mark.parametrize(
    "block",
    [
        Stack("a", Parallel("b", "c")),
        BatchSplit(Stack("a", "b"), "c", batch_sizes=1),
        Average(Stack("a", "b"), Split("a", "b", splits=1), BatchSplit("a", "b", batch_sizes=1)),
        MultiTask(Stack("a", "b"), Average("b", "c"), Fuse("a", "b")),
        Parallel(Stack("a", "b"), Average(Stack("b", "c"), "a")),
        Split(Split("a", "b", splits=1), Stack("c", "d"), splits=2),
    ],
)
def test_validate_accepts_allowed_nestings(block):
    validate(block)


def test_set_adapter_refuses_a_bad_nesting_and_changes_nothing(llama):
    llama.set_adapter(Stack("a", "b"))
    with pytest.raises(ConfigError, match=r"Average cannot go inside Average"):
        llama.set_adapter(Average(Average("a", "b"), "c"))
    with pytest.raises(AdapterNameError, match=r"no adapter named 'zz'"):
        llama.set_adapter(Stack("a", "zz"))
    assert llama.active_composition == Stack("a", "b")
    assert llama.active_adapters == ["a", "b"]


# --- Stack ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [["a"], ["a", "b"], ["c", "a", "b"]])
def test_a_stack_of_names_is_those_adapters_all_active(llama, names):
    x = ids(3)
    expected = alone(llama, names, x)
    llama.set_adapter(Stack(*names))
    assert llama.active_adapters == names
    torch.testing.assert_close(logits(llama, x), expected, **TOL)


# --- BatchSplit ----------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    children=st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=3),
    data=st.data(),
)
def test_batch_split_rows_are_each_childs_own(llama, children, data):
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=len(children), max_size=len(children)))
    if sum(sizes) == 0:
        sizes[0] = 1
    x = ids(sum(sizes), seed=sum(sizes))
    expected, start = [], 0
    for child, size in zip(children, sizes):
        expected.append(alone(llama, child, x)[start : start + size])
        start += size
    llama.set_adapter(BatchSplit(*children, batch_sizes=sizes))
    torch.testing.assert_close(logits(llama, x), torch.cat(expected), **TOL)


def test_batch_split_names_both_sizes_when_they_do_not_add_up(llama):
    llama.set_adapter(BatchSplit("a", "b", batch_sizes=[1, 2]))
    with pytest.raises(ValueError, match=r"splits 3 rows, but the batch has 4"):
        logits(llama, ids(4))


def test_a_stack_inside_batch_split_runs_on_its_rows(llama):
    x = ids(4, seed=3)
    stacked = alone(llama, ["a", "b"], x)
    only_c = alone(llama, "c", x)
    llama.set_adapter(BatchSplit(Stack("a", "b"), "c", batch_sizes=[3, 1]))
    out = logits(llama, x)
    torch.testing.assert_close(out[:3], stacked[:3], **TOL)
    torch.testing.assert_close(out[3:], only_c[3:], **TOL)


# --- MultiTask -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task_ids",
    [[2, 0, 1, 0], torch.tensor([2, 0, 1, 0]), ["c", "a", "b", "a"]],
    ids=["ints", "tensor", "names"],
)
def test_multi_task_runs_each_row_with_its_task(llama, task_ids):
    x = ids(4, seed=4)
    reference = {name: alone(llama, name, x) for name in "abc"}
    llama.set_adapter(MultiTask("a", "b", "c"))
    out = logits(llama, x, task_ids=task_ids)
    for row, name in enumerate(["c", "a", "b", "a"]):
        torch.testing.assert_close(out[row], reference[name][row], **TOL)


@pytest.mark.parametrize(
    "task_ids, error, message",
    [
        (None, ValueError, r"MultiTask\('a', 'b'\) needs task_ids="),
        ([0, 1], ValueError, r"task_ids has 2 entries, but the batch has 3 rows"),
        (["a", "zz", "b"], ValueError, r"task_ids names 'zz', which is not a child of MultiTask"),
        ([0, 2, 1], ValueError, r"task_ids holds 2; each entry must be a child's index \(0 to 1\) or name"),
        ([0, -1, 1], ValueError, r"task_ids holds -1"),
    ],
)
def test_multi_task_refuses_task_ids_that_do_not_fit(llama, task_ids, error, message):
    llama.set_adapter(MultiTask("a", "b"))
    with pytest.raises(error, match=message):
        logits(llama, ids(3), task_ids=task_ids)


def test_task_ids_without_a_multi_task_are_refused(llama):
    llama.set_adapter(Average("a", "b"))
    with pytest.raises(ValueError, match=r"task_ids= is for a MultiTask composition, and none is active"):
        logits(llama, ids(2), task_ids=[0, 1])
    llama.set_adapter("a")
    with pytest.raises(ValueError, match=r"task_ids= is for a MultiTask"):
        llama.generate(input_ids=ids(2), task_ids=[0, 1], max_new_tokens=1)


# --- Parallel ------------------------------------------------------------------------------------------------
def test_parallel_gives_each_child_a_copy_of_the_batch(llama):
    x = ids(3, seed=5)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # padding must be repeated with the rows it belongs to
    first = alone(llama, "a", x, attention_mask=mask)
    second = alone(llama, "b", x, attention_mask=mask)
    llama.set_adapter(Parallel("a", "b"))
    out = logits(llama, x, attention_mask=mask)
    assert out.shape[0] == 6
    torch.testing.assert_close(out[:3], first, **TOL)
    torch.testing.assert_close(out[3:], second, **TOL)


def test_parallel_inside_a_stack_runs_the_stacked_adapter_under_each_branch(llama):
    x = ids(2, seed=6)
    with_b = alone(llama, ["a", "b"], x)
    with_c = alone(llama, ["a", "c"], x)
    llama.set_adapter(Stack("a", Parallel("b", "c")))
    out = logits(llama, x)
    assert out.shape[0] == 4
    torch.testing.assert_close(out[:2], with_b, **TOL)
    torch.testing.assert_close(out[2:], with_c, **TOL)


def test_generate_with_parallel_returns_each_childs_sequences(llama):
    x = ids(2, length=4, seed=7)
    settings_ = dict(max_new_tokens=3, do_sample=False)
    llama.set_adapter("a")
    first = llama.generate(input_ids=x, **settings_)
    llama.set_adapter("b")
    second = llama.generate(input_ids=x, **settings_)
    llama.set_adapter(Parallel("a", "b"))
    both = llama.generate(input_ids=x, **settings_)
    assert both.shape[0] == 4
    assert torch.equal(both[:2], first)
    assert torch.equal(both[2:], second)


def test_generate_with_multi_task_gives_each_row_its_tasks_sequence(llama):
    x = ids(3, length=4, seed=18)
    settings_ = dict(max_new_tokens=3, do_sample=False)
    reference = {}
    for name in "ab":
        llama.set_adapter(name)
        reference[name] = llama.generate(input_ids=x, **settings_)
    llama.set_adapter(MultiTask("a", "b"))
    out = llama.generate(input_ids=x, task_ids=["b", "a", "b"], **settings_)
    assert torch.equal(out, torch.stack([reference["b"][0], reference["a"][1], reference["b"][2]]))


# --- Split ---------------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 6), data=st.data())
def test_split_sends_the_first_tokens_through_one_child_and_the_rest_through_the_other(
    per_token, length, data
):
    k = data.draw(st.integers(0, length))
    x = ids(2, length=length, seed=length, vocab=50)
    first = alone(per_token, "a", x)
    second = alone(per_token, "b", x)
    per_token.set_adapter(Split("a", "b", splits=[k, length - k]))
    out = logits(per_token, x)
    torch.testing.assert_close(out[:, :k], first[:, :k], **TOL)
    torch.testing.assert_close(out[:, k:], second[:, k:], **TOL)


def test_split_inside_batch_split(per_token):
    x = ids(3, length=4, seed=8, vocab=50)
    first, second, third = (alone(per_token, name, x) for name in "abc")
    per_token.set_adapter(BatchSplit(Split("a", "b", splits=[1, 3]), "c", batch_sizes=[2, 1]))
    out = logits(per_token, x)
    torch.testing.assert_close(out[:2, :1], first[:2, :1], **TOL)
    torch.testing.assert_close(out[:2, 1:], second[:2, 1:], **TOL)
    torch.testing.assert_close(out[2:], third[2:], **TOL)


def test_split_on_tiny_plain_leaves_the_convolution_that_holds_no_split_adapter_alone():
    # the convolution mixes tokens; adapters after it act on each token, and "c" on it acts on all of them
    model = get_peft_model(
        tiny_plain(), LoraConfig(r=2, target_modules=["fc1", "head"], init_lora_weights=False), "a"
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    model.eval()
    x = ids(2, length=6, seed=9)
    first, second = alone(model, "a", x), alone(model, "b", x)
    model.set_adapter(Split("a", "b", splits=[2, 4]))
    out = logits(model, x)
    torch.testing.assert_close(out[:, :2], first[:, :2], **TOL)
    torch.testing.assert_close(out[:, 2:], second[:, 2:], **TOL)

    first, second = alone(model, ["c", "a"], x), alone(model, ["c", "b"], x)
    model.set_adapter(Stack("c", Split("a", "b", splits=[2, 4])))
    out = logits(model, x)
    torch.testing.assert_close(out[:, :2], first[:, :2], **TOL)
    torch.testing.assert_close(out[:, 2:], second[:, 2:], **TOL)


def test_split_refuses_adapters_on_a_convolution_whose_dimension_1_is_channels():
    model = get_peft_model(
        tiny_plain(), LoraConfig(r=2, target_modules=["conv", "fc1"], init_lora_weights=False), "a"
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    model.set_adapter("b")
    with pytest.raises(ConfigError, match=r"LoraLayer wraps a conv1d layer, .*adapters \['a'\] are on it"):
        model.set_adapter(Split("a", "b", splits=[2, 4]))
    with pytest.raises(ConfigError, match=r"conv1d layer"):
        model.set_adapter(BatchSplit(Split("b", "a", splits=1), "b", batch_sizes=1))
    assert model.active_composition is None and model.active_adapters == ["b"]
    model.set_adapter(BatchSplit("a", Split("b", "b", splits=1), batch_sizes=1))


def test_split_on_bert_ignores_the_pooler_that_holds_no_split_adapter():
    model = get_peft_model(
        tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False), "a"
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    model.add_adapter("head", LoraConfig(r=2, target_modules=["pooler.dense"], init_lora_weights=False))
    model.set_adapter(Split("a", "b", splits=[3, 3]))
    assert logits(model.eval(), ids(2, length=6)).shape == (2, 2)


def test_split_refuses_sequences_of_another_length(per_token):
    per_token.set_adapter(Split("a", "b", splits=[2, 3]))
    with pytest.raises(ValueError, match=r"splits 5 tokens, but the sequence has 4"):
        logits(per_token, ids(2, length=4, vocab=50))


def test_split_refuses_a_layer_whose_input_has_no_sequence():
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)),
        LoraConfig(r=2, target_modules=["0"], init_lora_weights=False),
        "a",
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.set_adapter(Split("a", "b", splits=[1, 1]))
    with pytest.raises(ConfigError, match=r"Split splits sequences, and LoraLayer sees no \(batch, sequence"):
        with torch.no_grad():
            model(torch.randn(2, 8))


# --- Average, and other methods' layers ----------------------------------------------------------------------
def base_linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 6)


def one_layer(config_for, names=("a", "b")):
    """A single adapted Linear: the model's output is the layer's, so a layer-level Average is checkable
    against the weighted sum of outputs whatever the method."""
    model = get_peft_model(torch.nn.Sequential(base_linear()), config_for(names[0]), names[0])
    for name in names[1:]:
        model.add_adapter(name, config_for(name))
    for seed, name in enumerate(names):
        model.set_adapter(name)
        randomize_trainable(model, seed=seed + 3, scale=0.3)
    return model.eval()


FRIENDS = {
    "lora": lambda name: LoraConfig(r=2, target_modules=["0"], init_lora_weights=False),
    "loha": lambda name: LoHaConfig(r=2, target_modules=["0"], init_weights=False),
    "lokr": lambda name: LoKrConfig(r=2, target_modules=["0"], init_weights=False),
    # AdaLoRA trains one adapter per model; the second one is added for inference
    "adalora": lambda name: AdaLoraConfig(
        init_r=2,
        target_r=2,
        target_modules=["0"],
        init_lora_weights=False,
        total_step=10,
        inference_mode=name != "a",
    ),
}


@pytest.mark.parametrize("method", sorted(FRIENDS))
def test_every_token_wise_block_on_every_method_that_declares_them(method):
    model = one_layer(FRIENDS[method])
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = base_linear()(x)
        model.set_adapter("a")
        ya = model(x)
        model.set_adapter("b")
        yb = model(x)
        assert not torch.allclose(ya, yb) and not torch.allclose(ya, base)
        model.set_adapter(Average("a", "b", weights=[1, 3]))
        torch.testing.assert_close(model(x), 0.25 * ya + 0.75 * yb, **TOL)
        model.set_adapter(Average("a", "b", weights=[0.5, 2.0], normalize_weights=False))
        torch.testing.assert_close(model(x), 0.5 * ya + 2.0 * yb - 1.5 * base, **TOL)
        model.set_adapter(BatchSplit("b", "a", batch_sizes=[1, 2]))
        torch.testing.assert_close(model(x), torch.cat([yb[:1], ya[1:]]), **TOL)
        model.set_adapter(MultiTask("a", "b"))
        torch.testing.assert_close(model(x, task_ids=[1, 0, 1]), torch.stack([yb[0], ya[1], yb[2]]), **TOL)
        model.set_adapter(Split("a", "b", splits=[3, 1]))
        torch.testing.assert_close(model(x), torch.cat([ya[:, :3], yb[:, 3:]], dim=1), **TOL)


# --- what other methods take part in -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed():
    model = three_lora_llama()
    model.add_adapter("p", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.add_adapter(
        "i",
        IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    )
    return model.eval()


def test_a_prompt_adapter_takes_part_only_in_a_stack(mixed):
    with pytest.raises(
        ConfigError,
        match=r"adapter 'p' is a prompt_tuning adapter, which cannot take part in Average.*: Stack$",
    ):
        mixed.set_adapter(Average("p", "a"))
    with pytest.raises(ConfigError, match=r"prompt_tuning adapter, which cannot take part in BatchSplit"):
        mixed.set_adapter(BatchSplit("a", Stack("p", "b"), batch_sizes=1))
    x = ids(2, seed=10)
    expected = alone(mixed, ["p", "a"], x)
    mixed.set_adapter(Stack("p", "a"))
    torch.testing.assert_close(logits(mixed, x), expected, **TOL)


def test_lora_layers_do_not_fuse(llama):
    llama.set_adapter("a")
    with pytest.raises(peftkit.PeftkitError, match=r"Fuse"):
        llama.set_adapter(Fuse("a", "b"))
    with pytest.raises(peftkit.PeftkitError, match=r"Fuse"):
        llama.set_adapter(MultiTask(Fuse("a", "b"), "c"))
    assert llama.active_composition is None and llama.active_adapters == ["a"]


def test_ia3_layers_do_only_stack(mixed):
    with pytest.raises(ConfigError, match=r"adapter 'i' is a ia3 adapter, which cannot take part in Average"):
        mixed.set_adapter(Average("i", "a"))
    with pytest.raises(ConfigError, match=r"cannot take part in Parallel"):
        mixed.set_adapter(Parallel("i", "a"))
    x = ids(2, seed=11)
    expected = alone(mixed, ["i", "a"], x)
    mixed.set_adapter(Stack("i", "a"))
    torch.testing.assert_close(logits(mixed, x), expected, **TOL)


class OnlyStackForLora:
    @method_impl("lora")
    def peftkit_composition_blocks(self, peft_model, config, adapter_name):
        return ["Stack"]


class AverageForIA3:
    @method_impl("ia3")
    def peftkit_composition_blocks(self, peft_model, config, adapter_name):
        return ["Stack", "Average"]


class UnknownBlockForLora:
    @method_impl("lora")
    def peftkit_composition_blocks(self, peft_model, config, adapter_name):
        return ["Stack", "Blend"]


def test_a_plugin_can_restrict_what_its_method_takes_part_in(llama):
    with plugins.registered(OnlyStackForLora(), name="only-stack"):
        with pytest.raises(
            ConfigError, match=r"'a' is a lora adapter, which cannot take part in Average.*: Stack$"
        ):
            llama.set_adapter(Average("a", "b"))
        llama.set_adapter(Stack("a", "b"))
    llama.set_adapter(Average("a", "b"))  # unregistered: LoRA's layers' own answer again


def test_a_plugin_can_widen_what_its_method_takes_part_in():
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)),
        IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False),
        "i",
    )
    model.add_adapter("a", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_adapter("i")
        yi = model(x)
        model.set_adapter("a")
        ya = model(x)
        with plugins.registered(AverageForIA3(), name="ia3-average"):
            model.set_adapter(Average("i", "a", weights=[1, 3]))
        torch.testing.assert_close(model(x), 0.25 * yi + 0.75 * ya, **TOL)


def test_a_hook_naming_an_unknown_block_is_a_type_error(llama):
    with plugins.registered(UnknownBlockForLora(), name="unknown-block"):
        with pytest.raises(TypeError, match=r"'lora' names unknown composition blocks \['Blend'\]"):
            llama.set_adapter(Stack("a", "b"))


# --- what a block refuses ------------------------------------------------------------------------------------
def test_merging_while_a_block_is_active_points_to_add_weighted_adapter():
    model = three_lora_llama()
    model.set_adapter(Average("a", "b"))
    with pytest.raises(MergeNotSupportedError, match=r"add_weighted_adapter\(.*combination_type='cat'\)"):
        model.merge_adapter()


def test_mixed_batches_are_refused_while_a_block_is_active(llama):
    llama.set_adapter(Average("a", "b"))
    with pytest.raises(
        ValueError, match=r"adapter_names= cannot be used while a composition block is active"
    ):
        logits(llama, ids(2), adapter_names=["a", "b"])
    with pytest.raises(
        ValueError, match=r"adapter_names= cannot be used while a composition block is active"
    ):
        llama.generate(input_ids=ids(2), adapter_names=["a", "b"], max_new_tokens=1)


def test_a_block_cannot_be_set_while_adapters_are_merged():
    model = three_lora_llama()
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.raises(
        ConfigError, match=r"cannot run while adapters are merged \(a\); call unmerge_adapter"
    ):
        model.set_adapter(Average("a", "b"))
    model.unmerge_adapter()
    model.set_adapter(Average("a", "b"))


def test_a_block_holds_at_most_one_adapter_with_a_task_head():
    model = get_peft_model(
        tiny_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "a"
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["value"]))
    with pytest.raises(ConfigError, match=r"adapters \['a', 'b'\] each have modules_to_save"):
        model.set_adapter(Average("a", "b"))
    model.set_adapter(BatchSplit("a", "c", batch_sizes=1))


# --- switching off, deleting, training ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "block", [Average("a", "b"), BatchSplit("a", "c", batch_sizes=[1, 1]), Parallel("a", "b")], ids=repr
)
def test_disable_adapter_inside_a_block_gives_the_base_model(llama, block):
    x = ids(2, seed=12)
    base = logits(tiny_llama(seed=0), x)
    llama.set_adapter(block)
    with llama.disable_adapter():
        torch.testing.assert_close(logits(llama, x), base, **TOL)
    assert llama.active_composition == block


def test_deleting_an_adapter_of_the_active_block_leaves_the_others_active():
    model = three_lora_llama()
    x = ids(2, seed=13)
    expected = alone(model, "a", x)
    model.set_adapter(Average("a", "b"))
    model.delete_adapter("b")
    assert model.active_composition is None
    assert model.active_adapters == ["a"]
    torch.testing.assert_close(logits(model, x), expected, **TOL)


def test_deleting_an_adapter_outside_the_active_block_keeps_the_block():
    model = one_layer(FRIENDS["lora"], names=("a", "b", "c"))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.set_adapter("a")
        ya = model(x)
        model.set_adapter("b")
        yb = model(x)
    model.set_adapter(Average("a", "b", weights=[1, 3]))
    model.delete_adapter("c")
    assert model.active_composition == Average("a", "b", weights=[1, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x), 0.25 * ya + 0.75 * yb, **TOL)


def test_training_an_average_trains_both_adapters_and_nothing_else():
    model = three_lora_llama().train()
    model.set_adapter(Average("a", "b", weights=[1, 2]))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".a." in name or ".b." in name for name in trainable)
    assert any(".a." in name for name in trainable) and any(".b." in name for name in trainable)
    x = ids(2, seed=14)
    model(input_ids=x, labels=x).loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


# --- autocast and compile ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "block", [Average("a", "b", weights=[1, 3]), BatchSplit("a", "b", batch_sizes=[1, 2])], ids=repr
)
def test_blocks_run_under_bf16_autocast_close_to_float32(llama, block):
    x = ids(3, seed=15)
    llama.set_adapter(block)
    expected = logits(llama, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(llama, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("block", [Average("a", "b", weights=[1, 2]), Stack("a", "b")], ids=repr)
def test_a_fullgraph_compile_with_average_or_stack_equals_eager(per_token, block, peftkit_fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    x = ids(3, seed=16, vocab=50)
    per_token.set_adapter(block)
    expected = logits(per_token, x)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(per_token, backend=counter, fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=x)
    torch.testing.assert_close(out, expected, **TOL)
    assert counter.frame_count == 1


def test_a_compiled_model_with_batch_split_gives_eagers_outputs(per_token, peftkit_fresh_dynamo):
    x = ids(3, seed=17, vocab=50)
    per_token.set_adapter(BatchSplit("a", "b", batch_sizes=[2, 1]))
    expected = logits(per_token, x)
    compiled = torch.compile(per_token, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x), expected, **TOL)
