"""Grouped down-projections for sibling layers (peftkit_lora.siblings): q, k and v (and gate and up) get
their ``x Aᵀ`` from one product, with the per-layer path's outputs and gradients, on every path users take."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import LoraConfig, get_peft_model
from peftkit.testing.models import randomize_trainable, same_weights_copy, tiny_llama
from peftkit_lora import fused, siblings
from peftkit_lora.layer import LoraLayer
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2  # tiny_llama's decoder layers: each has one q/k/v group and one gate/up group


@pytest.fixture(autouse=True)
def _forget_groups():
    siblings.forget()
    yield
    siblings.forget()


@pytest.fixture
def grouped_products(monkeypatch) -> list[int]:
    """How many grouped products ran (one list entry per product, its number of layers)."""
    products: list[int] = []
    apply = fused.GroupedDown.apply

    def counting(x, stacked, *factors):
        products.append(len(factors))
        return apply(x, stacked, *factors)

    monkeypatch.setattr(fused.GroupedDown, "apply", counting)
    return products


def lora_llama(seed: int = 0, r: int = 4, dropout: float = 0.0, **model_settings):
    model = get_peft_model(
        tiny_llama(seed, **model_settings), LoraConfig(r=r, target_modules=ALL_LINEAR, lora_dropout=dropout)
    )
    randomize_trainable(model, seed=seed + 1)
    return model.train()


def training_step(model, ids: torch.Tensor, grouped: bool, monkeypatch, steps: int = 2):
    """Logits and adapter gradients of the last of ``steps`` forward-backward passes (the first learns)."""
    monkeypatch.setattr(LoraLayer, "group_siblings", grouped)
    for _ in range(steps):
        for param in model.parameters():
            param.grad = None
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {
        name.removeprefix("_orig_mod."): param.grad.clone()  # torch.compile's wrapper names its module so
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    return out.logits.detach(), grads


def assert_same_step(expected, got, of_largest: float = 0.0, **tolerance) -> None:
    """Logits and gradients equal within ``tolerance``, plus ``of_largest`` times each tensor's largest
    magnitude (one product for three reorders the sums: a few float32 roundings, which attention and
    the loss amplify near zero)."""

    def close(actual, wanted, **extra):
        atol = tolerance.get("atol", 0.0) + of_largest * wanted.abs().max().item()
        torch.testing.assert_close(actual, wanted, rtol=tolerance.get("rtol", 0.0), atol=atol, **extra)

    close(got[0], expected[0])
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        close(got[1][name], grad, msg=lambda m, name=name: f"{name}: {m}")


def test_off_by_default():
    assert LoraLayer.group_siblings is False


def test_a_forward_learns_which_layers_read_one_input(monkeypatch):
    monkeypatch.setattr(LoraLayer, "group_siblings", True)
    model = lora_llama().eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    names = {module: name.split("model.layers.")[-1] for name, module in model.named_modules()}
    groups = sorted(tuple(names[ref()] for ref in group.members) for group in siblings._groups.values())
    assert groups == [
        (f"{layer}.{block}.{proj}", *(f"{layer}.{block}.{sibling}" for sibling in siblings_of))
        for layer in range(LAYERS)
        for block, proj, siblings_of in (
            ("mlp", "gate_proj", ["up_proj"]),
            ("self_attn", "q_proj", ["k_proj", "v_proj"]),
        )
    ]


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 1000),
    r=st.integers(1, 8),
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    bias=st.booleans(),
)
def test_a_grouped_training_step_is_the_per_layer_step(seed, r, batch, length, bias):
    with pytest.MonkeyPatch.context() as monkeypatch:
        products: list[int] = []
        apply = fused.GroupedDown.apply
        monkeypatch.setattr(
            fused.GroupedDown, "apply", lambda *args: products.append(len(args) - 2) or apply(*args)
        )
        siblings.forget()
        model = lora_llama(seed, r=r, attention_bias=bias, mlp_bias=bias)
        ids = torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
        expected = training_step(same_weights_copy(model), ids, False, monkeypatch)
        assert products == []
        got = training_step(model, ids, True, monkeypatch)
    # the first step learns the groups, the second computes q/k/v as one product and gate/up as another
    assert products == [3, 2] * LAYERS
    # seed=1, r=1, batch=3, length=7, bias=True: a lora_A gradient 3e-5 of its largest value apart
    assert_same_step(expected, got, of_largest=1e-4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_is_the_per_layer_inference(mode, monkeypatch, grouped_products):
    model = lora_llama().eval()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        expected = model(input_ids=ids).logits
        monkeypatch.setattr(LoraLayer, "group_siblings", True)
        model(input_ids=ids)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # inference tensors have no version counter to tell a change made in place: each layer its own
    assert grouped_products == ([3, 2] * LAYERS if mode == "no_grad" else [])


def test_dropout_in_training_leaves_each_layer_its_own_mask(monkeypatch, grouped_products):
    model = lora_llama(dropout=0.1)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    expected = training_step(same_weights_copy(model), ids, False, monkeypatch)
    torch.manual_seed(5)
    got = training_step(model, ids, True, monkeypatch)
    assert grouped_products == []
    assert_same_step(expected, got, rtol=0, atol=0)
    model.eval()  # no dropout in effect: grouped again
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)
    assert grouped_products == [3, 2] * LAYERS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_a_grouped_step_is_the_per_layer_step(dtype, monkeypatch, grouped_products):
    model = lora_llama()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=dtype):
        expected = training_step(same_weights_copy(model), ids, False, monkeypatch)
        got = training_step(model, ids, True, monkeypatch)
    assert grouped_products == [3, 2] * LAYERS
    # the same low-precision products, summed perhaps in another order: a few units of roundoff
    eps = torch.finfo(dtype).eps
    assert_same_step(expected, got, rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_per_layer_gradients(use_reentrant, monkeypatch):
    model = lora_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = training_step(same_weights_copy(model), ids, False, monkeypatch)
    got = training_step(model, ids, True, monkeypatch, steps=3)
    assert_same_step(expected, got, rtol=1e-5, atol=1e-6)


def test_compiles_as_one_graph_with_the_per_layer_values(monkeypatch):
    torch._dynamo.reset()
    model = lora_llama()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = training_step(same_weights_copy(model), ids, False, monkeypatch)
    training_step(model, ids, True, monkeypatch)  # eager first: the groups are learnt before tracing
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = training_step(compiled, ids, True, monkeypatch, steps=3)
    torch._dynamo.reset()
    assert_same_step(expected, got, rtol=1e-5, atol=1e-6)


class ReadsTwice(nn.Module):
    """Two layers that read one input, unless told to change it in between or to skip the second."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(6, 5)
        self.k = nn.Linear(6, 4)

    def forward(self, x, change_between: bool = False, skip_k: bool = False):
        first = self.q(x)
        if change_between:
            x.mul_(-2.0)
        return first, (None if skip_k else self.k(x))


def grouped_and_per_layer(monkeypatch, calls):
    """The outputs of ``ReadsTwice`` with LoRA for each call of ``calls`` (kwargs), grouped and per layer."""
    model = get_peft_model(ReadsTwice(), LoraConfig(r=2, target_modules=["q", "k"]))
    randomize_trainable(model)
    outputs = {}
    for grouped in (False, True):
        monkeypatch.setattr(LoraLayer, "group_siblings", grouped)
        with torch.no_grad():
            outputs[grouped] = [
                model(torch.linspace(-1, 1, 12).view(2, 6), **kwargs) for kwargs in [{}, *calls]
            ]
    return outputs[False], outputs[True]


def test_a_sibling_whose_input_changed_in_place_computes_its_own(monkeypatch, grouped_products):
    expected, got = grouped_and_per_layer(monkeypatch, [{"change_between": True}, {}, {}])
    # learnt; grouped, but k refuses its piece (its input changed) and q, alone, forgets; learnt; grouped
    assert grouped_products == [2, 2]
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want)


def test_a_sibling_left_out_leaves_nothing_wrong_behind(monkeypatch, grouped_products):
    expected, got = grouped_and_per_layer(monkeypatch, [{"skip_k": True}, {"skip_k": True}, {}, {}])
    for want, have in zip(expected, got):
        torch.testing.assert_close(have[0], want[0])
        assert (have[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(have[1], want[1])
    assert grouped_products  # the last calls group again


def test_a_layer_with_forward_hooks_computes_its_own(monkeypatch, grouped_products):
    model = lora_llama().eval()
    for layer in model.base_model.model.model.layers:
        layer.self_attn.k_proj.register_forward_pre_hook(lambda module, args: None)
    monkeypatch.setattr(LoraLayer, "group_siblings", True)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert grouped_products == [2, 2] * LAYERS  # q with v, gate with up


def test_remembered_groups_do_not_keep_a_model_alive(monkeypatch):
    monkeypatch.setattr(LoraLayer, "group_siblings", True)
    model = lora_llama().eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(siblings._groups) == 2 * LAYERS
    del model
    siblings._local.run = None  # the thread's open run holds weak references only, but drop it too
    gc.collect()
    assert len(siblings._groups) == 0
