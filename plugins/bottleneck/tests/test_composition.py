"""Bottleneck adapters under composition blocks (Stack, Average, Split, BatchSplit, MultiTask, Parallel).

Every expected value is computed here by hand from the adapters' own tensors, ``s · up(act(down(h)))`` with
the activation and scaling their configs name, never by the composition code under test: one block called
directly (each placement: after a block, around BERT's norm, beside BERT's residual, beside a block), whole
models against forward hooks that do the same sums on the base model, and row blocks against single-adapter
runs. AdapterFusion: test_fusion.py. Equality with AdapterHub's adapters 1.3: test_adapterhub_equality.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import ConfigError, get_peft_model
from peftkit.composition import Average, BatchSplit, MultiTask, Parallel, Split, Stack
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_llama
from peftkit_bottleneck import BottleneckConfig, BottleneckLayer
from torch.nn import functional as F

TOL = dict(rtol=1e-5, atol=1e-5)
ACTIVATIONS = {"swish": F.silu, "tanh": torch.tanh, "relu": F.relu}
SETTINGS = settings(max_examples=8, deadline=None)


# tiny models: one intra-op thread (see peftkit.testing.pytest_plugin)
pytestmark = pytest.mark.usefixtures("peftkit_one_thread")


# --- models ----------------------------------------------------------------------------------------------
def with_adapters(base, configs: dict[str, BottleneckConfig]):
    """``base`` with the adapters ``configs`` names, each given random (trained-looking) weights."""
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    for seed, name in enumerate(names):
        model.set_adapter(name)
        randomize_trainable(model, seed=seed + 3, scale=0.3)
    return model.eval()


def houlsby(**options):
    return BottleneckConfig(style="houlsby", **options)


def pfeiffer(**options):
    return BottleneckConfig(style="pfeiffer", **options)


def parallel(**options):
    return BottleneckConfig(style="parallel", **options)


# three adapters of one style that differ in size, activation and scaling
KINDS = {
    # after the attention and the MLP blocks
    "llama_houlsby": (
        tiny_llama,
        {
            "a": houlsby(reduction_factor=4),
            "b": houlsby(reduction_factor=8, non_linearity="tanh", scaling=0.5),
            "c": houlsby(reduction_factor=2, non_linearity="relu", scaling=2.0),
        },
    ),
    # around BERT's LayerNorm after the feed-forward residual add (original_ln_before=True)
    "bert_pfeiffer": (
        tiny_bert,
        {
            "a": pfeiffer(reduction_factor=4),
            "b": pfeiffer(reduction_factor=8, non_linearity="tanh", scaling=0.5),
            "c": pfeiffer(reduction_factor=2, scaling=2.0),
        },
    ),
    # beside BertOutput, on its residual input
    "bert_parallel": (
        tiny_bert,
        {
            "a": parallel(reduction_factor=4),
            "b": parallel(reduction_factor=8, non_linearity="tanh", scaling=0.5),
            "c": parallel(reduction_factor=2, scaling=1.0),
        },
    ),
    # beside Llama's MLP, reading its input
    "llama_parallel": (
        tiny_llama,
        {
            "a": parallel(reduction_factor=4, parallel_input="block_input"),
            "b": parallel(reduction_factor=8, non_linearity="tanh", scaling=0.5, parallel_input="block_input"),
            "c": parallel(reduction_factor=2, scaling=1.0, parallel_input="block_input"),
        },
    ),
    # beside Llama's MLP, reading the residual stream before its norm (AdapterHub's parallel adapter)
    "llama_parallel_stream": (
        tiny_llama,
        {
            "a": parallel(reduction_factor=4),
            "b": parallel(reduction_factor=8, non_linearity="tanh", scaling=0.5),
            "c": parallel(reduction_factor=2, scaling=1.0),
        },
    ),
    # after each whole decoder layer (original_ln_before=True on a pre-norm decoder)
    "llama_pfeiffer": (
        tiny_llama,
        {
            "a": pfeiffer(reduction_factor=4),
            "b": pfeiffer(reduction_factor=8, non_linearity="tanh", scaling=0.5),
        },
    ),
}
# the block each kind's layer-level checks call, and how it is called
LAYER_PATHS = {
    "llama_houlsby": "base_model.model.model.layers.0.mlp",
    "bert_pfeiffer": "base_model.model.bert.encoder.layer.0.output.LayerNorm",
    "bert_parallel": "base_model.model.bert.encoder.layer.0.output",
    "llama_parallel": "base_model.model.model.layers.0.mlp",
    "llama_parallel_stream": "base_model.model.model.layers.0.mlp",
}
# where llama_parallel_stream's adapters read the stream: the MLP runs on this norm's output
STREAM_NORM = "base_model.model.model.layers.0.post_attention_layernorm"
_BUILT: dict[str, object] = {}


def model_of(kind: str):
    """One model per kind for the whole module (tests set the composition they need)."""
    if kind not in _BUILT:
        build, configs = KINDS[kind]
        _BUILT[kind] = with_adapters(build(), configs)
    return _BUILT[kind]


def ids(rows: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **extra).logits


def alone(model, adapters, input_ids) -> torch.Tensor:
    model.set_adapter(adapters)
    return logits(model, input_ids)


# --- the references, by hand --------------------------------------------------------------------------------
def adapter(model, layer, name: str, h: torch.Tensor) -> torch.Tensor:
    """``scaling · up(act(down(h)))`` from the layer's tensors and the adapter's config."""
    config = model.peft_config[name]
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    z = ACTIVATIONS[config.non_linearity](F.linear(h, down.weight, down.bias))
    return config.scaling * F.linear(z, up.weight, up.bias)


def layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def layer_inputs(kind: str, rows: int = 2, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    if kind == "bert_parallel":  # BertOutput(intermediate h, residual r)
        return torch.randn(rows, length, 64, generator=generator), torch.randn(
            rows, length, 32, generator=generator
        )
    return (torch.randn(rows, length, 32, generator=generator),)


def layer_reference(kind: str, model, layer, inputs, combine) -> torch.Tensor:
    """The block's output when ``combine(state, one_step)`` says what becomes of the state that adapters change,
    ``one_step(name, state)`` being one adapter's step ``state + a(read(state))`` at this placement."""
    base = layer.base_layer
    if kind == "llama_houlsby":  # state: the MLP's output h; a reads h
        return combine(base(inputs[0]), lambda name, h: h + adapter(model, layer, name, h))
    if kind == "llama_parallel":  # state: the MLP's output; a reads the MLP's input x
        (x,) = inputs
        return combine(base(x), lambda name, h: h + adapter(model, layer, name, x))
    if kind == "llama_parallel_stream":  # state: the MLP's output on norm(r); a reads the stream r
        (r,) = inputs
        x = model.get_submodule(STREAM_NORM)(r)
        return combine(base(x), lambda name, h: h + adapter(model, layer, name, r))
    if kind == "bert_pfeiffer":  # state: the residual sum s; a reads LN(s); the block returns LN(final s)
        s = combine(inputs[0], lambda name, s: s + adapter(model, layer, name, layer_norm(base, s)))
        return layer_norm(base, s)
    if kind == "bert_parallel":  # state: the residual r; LN(dense(h) + final r)
        h, r = inputs
        r = combine(r, lambda name, r: r + adapter(model, layer, name, r))
        return layer_norm(base.LayerNorm, base.dense(h) + r)
    raise AssertionError(kind)


def stacked(*names):
    def combine(state, step):
        for name in names:
            state = step(name, state)
        return state

    return combine


def averaged(weights, names):
    def combine(state, step):
        rest = 1.0 - sum(weights)
        return sum(w * step(name, state) for w, name in zip(weights, names)) + rest * state

    return combine


def run_layer(model, kind: str, block, inputs) -> torch.Tensor:
    model.set_adapter(block)
    with torch.no_grad():
        if kind == "llama_parallel_stream":  # the norm first, as the decoder layer calls them
            return model.get_submodule(LAYER_PATHS[kind])(model.get_submodule(STREAM_NORM)(*inputs))
        return model.get_submodule(LAYER_PATHS[kind])(*inputs)


# --- Stack ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama_houlsby", "bert_pfeiffer"])
@pytest.mark.parametrize("names", [("a", "b"), ("b", "a"), ("a", "b", "c"), ("c",)], ids="+".join)
def test_stack_on_one_block_applies_the_adapters_in_turn(kind, names):
    model = model_of(kind)
    layer = model.get_submodule(LAYER_PATHS[kind])
    inputs = layer_inputs(kind, seed=len(names))
    with torch.no_grad():
        expected = layer_reference(kind, model, layer, inputs, stacked(*names))
    torch.testing.assert_close(run_layer(model, kind, Stack(*names), inputs), expected, **TOL)


def test_stack_order_matters_after_a_block():
    model = model_of("llama_houlsby")
    inputs = layer_inputs("llama_houlsby", seed=3)
    ab = run_layer(model, "llama_houlsby", Stack("a", "b"), inputs)
    ba = run_layer(model, "llama_houlsby", Stack("b", "a"), inputs)
    summed = run_layer(model, "llama_houlsby", ["a", "b"], inputs)  # both active, outputs added: not a stack
    assert not torch.allclose(ab, ba, atol=1e-4)
    assert not torch.allclose(ab, summed, atol=1e-4)


def _hooked(model, layer_hook) -> list:
    handles = []
    for _, layer in model.adapter_layers():
        if isinstance(layer, BottleneckLayer):
            handles.append(layer.base_layer.register_forward_hook(layer_hook(layer), with_kwargs=True))
    return handles


def test_stack_through_llama_equals_hooks_adding_each_adapter_after_each_block():
    model = model_of("llama_houlsby")
    x = ids(2, seed=4)

    def hook(layer):
        def after(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output
            for name in ("a", "c", "b"):
                h = h + adapter(model, layer, name, h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return after

    with model.disable_adapter():
        handles = _hooked(model, hook)
        try:
            expected = logits(model, x)
        finally:
            for handle in handles:
                handle.remove()
    assert not torch.allclose(expected, alone(model, "a", x), atol=1e-3)
    torch.testing.assert_close(alone(model, Stack("a", "c", "b"), x), expected, **TOL)


def test_stack_through_bert_equals_hooks_stepping_the_residual_sum_around_each_norm():
    model = model_of("bert_pfeiffer")
    x = ids(3, seed=5)

    def hook(layer):
        def around(norm, args, kwargs, output):
            s = args[0]
            for name in ("b", "a"):
                s = s + adapter(model, layer, name, layer_norm(norm, s))
            return layer_norm(norm, s)

        return around

    with model.disable_adapter():
        handles = _hooked(model, hook)
        try:
            expected = logits(model, x)
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(alone(model, Stack("b", "a"), x), expected, **TOL)


def test_stack_of_decoder_layer_adapters_equals_hooks_after_each_layer():
    model = model_of("llama_pfeiffer")
    x = ids(2, seed=6)

    def hook(layer):
        def after(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output
            for name in ("a", "b"):
                h = h + adapter(model, layer, name, h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return after

    with model.disable_adapter():
        handles = _hooked(model, hook)
        try:
            expected = logits(model, x)
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(alone(model, Stack("a", "b"), x), expected, **TOL)


def test_training_a_stack_trains_both_adapters_and_nothing_else():
    model = copy.deepcopy(model_of("llama_houlsby")).train()
    model.set_adapter(Stack("a", "b"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {
        name
        for name, _ in model.named_parameters()
        if ".adapter_down.a." in name
        or ".adapter_up.a." in name
        or ".adapter_down.b." in name
        or ".adapter_up.b." in name
    }
    x = ids(2, seed=7)
    model(input_ids=x, labels=x).loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


# --- Average --------------------------------------------------------------------------------------------------
@SETTINGS
@given(
    kind=st.sampled_from(sorted(LAYER_PATHS)),
    first=st.floats(0.0, 1.0),
)
def test_average_with_weights_summing_to_one_is_the_weighted_states(kind, first):
    model = model_of(kind)
    layer = model.get_submodule(LAYER_PATHS[kind])
    weights = [first, 1.0 - first]
    inputs = layer_inputs(kind, seed=8)
    with torch.no_grad():
        expected = layer_reference(kind, model, layer, inputs, averaged(weights, ["a", "b"]))
    out = run_layer(model, kind, Average("a", "b", weights=weights), inputs)
    torch.testing.assert_close(out, expected, **TOL)


@SETTINGS
@given(
    kind=st.sampled_from(sorted(LAYER_PATHS)),
    weights=st.lists(st.floats(-1.0, 3.0), min_size=3, max_size=3),
)
def test_average_without_normalising_gives_the_unchanged_state_the_remaining_weight(kind, weights):
    model = model_of(kind)
    layer = model.get_submodule(LAYER_PATHS[kind])
    inputs = layer_inputs(kind, seed=9)
    with torch.no_grad():
        expected = layer_reference(kind, model, layer, inputs, averaged(weights, ["a", "b", "c"]))
    out = run_layer(model, kind, Average("a", "b", "c", weights=weights, normalize_weights=False), inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_average_weights_are_normalised_by_default():
    model = model_of("llama_houlsby")
    inputs = layer_inputs("llama_houlsby", seed=10)
    normalised = run_layer(model, "llama_houlsby", Average("a", "b", weights=[1.0, 3.0]), inputs)
    quarter = run_layer(model, "llama_houlsby", Average("a", "b", weights=[0.25, 0.75]), inputs)
    torch.testing.assert_close(normalised, quarter, **TOL)


@pytest.mark.parametrize("kind", ["llama_houlsby", "bert_pfeiffer"])
def test_average_of_a_stack_and_an_adapter(kind):
    model = model_of(kind)
    layer = model.get_submodule(LAYER_PATHS[kind])
    inputs = layer_inputs(kind, seed=11)

    def combine(state, step):
        return 0.4 * step("b", step("a", state)) + 0.6 * step("c", state)

    with torch.no_grad():
        expected = layer_reference(kind, model, layer, inputs, combine)
    out = run_layer(model, kind, Average(Stack("a", "b"), "c", weights=[0.4, 0.6]), inputs)
    torch.testing.assert_close(out, expected, **TOL)


def test_average_of_bert_parallel_adapters_equals_a_hook_on_the_residual_input():
    model = model_of("bert_parallel")
    x = ids(2, seed=12)
    weights = [0.3, 0.7]

    def hook(layer):
        def residual(module, args, kwargs):
            h, r = args
            return (
                h,
                sum(w * (r + adapter(model, layer, name, r)) for w, name in zip(weights, "ab")),
            ), kwargs

        return residual

    with model.disable_adapter():
        handles = [
            layer.base_layer.register_forward_pre_hook(hook(layer), with_kwargs=True)
            for _, layer in model.adapter_layers()
            if isinstance(layer, BottleneckLayer)
        ]
        try:
            expected = logits(model, x)
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(alone(model, Average("a", "b", weights=weights), x), expected, **TOL)


# --- Split -----------------------------------------------------------------------------------------------------
@SETTINGS
@given(kind=st.sampled_from(sorted(LAYER_PATHS)), length=st.integers(1, 7), data=st.data())
def test_split_sends_each_token_through_its_childs_adapter(kind, length, data):
    k = data.draw(st.integers(0, length))
    model = model_of(kind)
    layer = model.get_submodule(LAYER_PATHS[kind])
    inputs = layer_inputs(kind, length=length, seed=length)
    with torch.no_grad():
        first = layer_reference(kind, model, layer, inputs, stacked("a"))
        second = layer_reference(kind, model, layer, inputs, stacked("b"))
    out = run_layer(model, kind, Split("a", "b", splits=[k, length - k]), inputs)
    torch.testing.assert_close(out[:, :k], first[:, :k], **TOL)
    torch.testing.assert_close(out[:, k:], second[:, k:], **TOL)


@pytest.mark.parametrize("kind", ["llama_houlsby", "bert_pfeiffer"])
def test_split_with_a_stack_and_an_average_inside(kind):
    model = model_of(kind)
    layer = model.get_submodule(LAYER_PATHS[kind])
    inputs = layer_inputs(kind, length=6, seed=13)
    with torch.no_grad():
        first = layer_reference(kind, model, layer, inputs, stacked("c", "a"))
        second = layer_reference(kind, model, layer, inputs, averaged([0.5, 0.5], ["a", "b"]))
    block = Split(Stack("c", "a"), Average("a", "b"), splits=[2, 4])
    out = run_layer(model, kind, block, inputs)
    torch.testing.assert_close(out[:, :2], first[:, :2], **TOL)
    torch.testing.assert_close(out[:, 2:], second[:, 2:], **TOL)


@pytest.mark.parametrize("kind", ["llama_houlsby", "llama_pfeiffer"])
def test_split_through_a_causal_model_gives_the_first_tokens_the_first_adapters_outputs(kind):
    # a causal LM's first k tokens see only themselves, all of which went through the first child everywhere
    model = model_of(kind)
    x = ids(2, length=7, seed=14)
    first = alone(model, "a", x)
    out = alone(model, Split("a", "b", splits=[3, 4]), x)
    torch.testing.assert_close(out[:, :3], first[:, :3], **TOL)
    assert not torch.allclose(out[:, 3:], first[:, 3:], atol=1e-4)


def test_a_split_that_does_not_cover_the_sequence_is_refused():
    model = model_of("llama_houlsby")
    model.set_adapter(Split("a", "b", splits=[2, 2]))
    with pytest.raises(ValueError, match=r"splits 4 tokens, but the sequence has 6"):
        logits(model, ids(2, length=6))


# --- rows: BatchSplit, MultiTask, Parallel ---------------------------------------------------------------------
ROW_KINDS = ["llama_houlsby", "bert_pfeiffer", "bert_parallel", "llama_pfeiffer", "llama_parallel_stream"]


@SETTINGS
@given(kind=st.sampled_from(ROW_KINDS), sizes=st.lists(st.integers(0, 3), min_size=2, max_size=2).filter(sum))
def test_batch_split_rows_equal_single_adapter_runs(kind, sizes):
    model = model_of(kind)
    x = ids(sum(sizes), seed=sum(sizes))
    expected = [alone(model, name, x) for name in ("a", "b")]
    out = alone(model, BatchSplit("a", "b", batch_sizes=sizes), x)
    torch.testing.assert_close(out[: sizes[0]], expected[0][: sizes[0]], **TOL)
    torch.testing.assert_close(out[sizes[0] :], expected[1][sizes[0] :], **TOL)


@SETTINGS
@given(
    kind=st.sampled_from(ROW_KINDS), tasks=st.lists(st.sampled_from([0, 1, "a", "b"]), min_size=1, max_size=4)
)
def test_multi_task_rows_equal_the_named_adapters_runs(kind, tasks):
    model = model_of(kind)
    x = ids(len(tasks), seed=len(tasks) + 20)
    expected = {name: alone(model, name, x) for name in ("a", "b")}
    model.set_adapter(MultiTask("a", "b"))
    out = logits(model, x, task_ids=tasks)
    for row, task in enumerate(tasks):
        name = task if isinstance(task, str) else "ab"[task]
        torch.testing.assert_close(out[row], expected[name][row], **TOL)


@SETTINGS
@given(kind=st.sampled_from(ROW_KINDS), rows=st.integers(1, 3))
def test_parallel_repeats_the_batch_once_per_child(kind, rows):
    model = model_of(kind)
    x = ids(rows, seed=rows + 30)
    expected = torch.cat([alone(model, name, x) for name in ("b", "a")])
    out = alone(model, Parallel("b", "a"), x)
    assert out.shape[0] == 2 * rows
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("kind", ["llama_houlsby", "bert_pfeiffer"])
def test_row_blocks_hold_stacks_and_averages(kind):
    model = model_of(kind)
    x = ids(3, seed=40)
    stack = alone(model, Stack("a", "b"), x)
    average = alone(model, Average("b", "c", weights=[0.2, 0.8]), x)
    c = alone(model, "c", x)
    out = alone(model, BatchSplit(Stack("a", "b"), "c", batch_sizes=[2, 1]), x)
    torch.testing.assert_close(out[:2], stack[:2], **TOL)
    torch.testing.assert_close(out[2:], c[2:], **TOL)
    out = alone(model, Parallel(Average("b", "c", weights=[0.2, 0.8]), Stack("a", "b")), x)
    torch.testing.assert_close(out, torch.cat([average, stack]), **TOL)


def test_stack_with_a_batch_split_inside():
    model = model_of("llama_houlsby")
    x = ids(3, seed=41)
    ca = alone(model, Stack("c", "a"), x)
    cb = alone(model, Stack("c", "b"), x)
    out = alone(model, Stack("c", BatchSplit("a", "b", batch_sizes=[1, 2])), x)
    torch.testing.assert_close(out[:1], ca[:1], **TOL)
    torch.testing.assert_close(out[1:], cb[1:], **TOL)


# --- what is refused --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert_parallel", "llama_parallel", "llama_parallel_stream"])
@pytest.mark.parametrize(
    "block",
    [Stack("a", "b"), Average(Stack("a", "b"), "c"), BatchSplit(Stack("c", "a"), "b", batch_sizes=[1, 1])],
    ids=repr,
)
def test_a_stack_over_parallel_adapters_is_refused(kind, block):
    model = model_of(kind)
    model.set_adapter(Average("a", "b"))
    with pytest.raises(ConfigError, match=r"Stack over parallel bottleneck adapters .*use Average"):
        model.set_adapter(block)
    # nothing changed: the composition before still runs
    assert model.active_composition == Average("a", "b")
    assert model.active_adapters == ["a", "b"]


def test_a_stack_of_one_parallel_adapter_is_allowed():
    model = model_of("bert_parallel")
    x = ids(2, seed=42)
    torch.testing.assert_close(alone(model, Stack("a"), x), alone(model, "a", x), **TOL)


@pytest.mark.parametrize(
    "block", [Average("h", "p"), Stack("h", "p"), Split("h", "p", splits=[3, 3])], ids=repr
)
def test_adapters_of_different_placements_in_one_block_are_refused(block):
    model = with_adapters(tiny_llama(), {"h": houlsby(reduction_factor=4), "p": parallel(reduction_factor=4)})
    with pytest.raises(
        ConfigError, match=r"sit in one block with different placements .*compose adapters of one style"
    ):
        model.set_adapter(block)
    assert model.active_composition is None


# --- paths users take: autocast, compile -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama_houlsby", "bert_pfeiffer"])
def test_average_runs_under_bf16_autocast_close_to_float32(kind):
    model = model_of(kind)
    x = ids(3, seed=50)
    model.set_adapter(Average("a", "b", weights=[1, 3]))
    expected = logits(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_a_fullgraph_compiled_model_with_a_stack_equals_eager(peftkit_fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    # one decoder layer: a quicker trace
    model = with_adapters(tiny_llama(num_hidden_layers=1), KINDS["llama_houlsby"][1])
    x = ids(2, seed=51)
    expected = alone(model, Stack("a", "b"), x)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=x).logits
    torch.testing.assert_close(out, expected, **TOL)
    assert counter.frame_count == 1
