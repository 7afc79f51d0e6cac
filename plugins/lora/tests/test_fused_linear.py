"""The fused LoRA node (peftkit_lora.fused) computes what the plain modules compute, and keeps less for backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import LoraConfig, get_peft_model
from peftkit.testing.models import tiny_llama
from peftkit_lora import fused
from peftkit_lora.layer import LoraLayer

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)


def plain(result, x, a, b, scaling, p, seed):
    """The plain path's math, with the fused node's mask for the same seed."""
    h = x * fused.dropout_keep(x, p, seed) / (1 - p) if p > 0 else x
    return result + (h @ a.T @ b.T) * scaling


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    r=st.integers(1, 5),
    scaling=st.floats(0.1, 4.0),
    p=st.sampled_from([0.0, 0.25, 0.6]),
    seed=st.integers(0, 2**31),
    batched=st.booleans(),
    tensor_scale=st.booleans(),
)
def test_fused_node_matches_plain_math_in_value_and_gradient(
    rows, in_features, out_features, r, scaling, p, seed, batched, tensor_scale
):
    """``tensor_scale``: the scale as a 0-dim float32 tensor (as prepare_model_for_compiled_hotswap makes)."""
    scaling = torch.tensor(scaling) if tensor_scale else scaling
    torch.manual_seed(seed)
    shape = (2, rows) if batched else (rows,)
    tensors = [
        torch.randn(*shape, out_features, dtype=torch.float64),
        torch.randn(*shape, in_features, dtype=torch.float64),
        torch.randn(r, in_features, dtype=torch.float64),
        torch.randn(out_features, r, dtype=torch.float64),
    ]
    fused_inputs = [t.clone().requires_grad_(True) for t in tensors]
    plain_inputs = [t.clone().requires_grad_(True) for t in tensors]
    out = fused.LoraLinear.apply(*fused_inputs, scaling, p, seed)
    expected = plain(*plain_inputs, scaling, p, seed)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(expected)
    out.backward(upstream)
    expected.backward(upstream)
    for got, want in zip(fused_inputs, plain_inputs):
        torch.testing.assert_close(got.grad, want.grad)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    r=st.integers(1, 5),
    scaling=st.floats(0.1, 4.0),
    p=st.sampled_from([0.0, 0.25, 0.6]),
    seed=st.integers(0, 2**31),
    with_bias=st.booleans(),
    tensor_scale=st.booleans(),
)
def test_node_with_the_base_matches_linear_plus_lora(
    rows, in_features, out_features, r, scaling, p, seed, with_bias, tensor_scale
):
    scaling = torch.tensor(scaling) if tensor_scale else scaling
    torch.manual_seed(seed)
    x = torch.randn(2, rows, in_features, dtype=torch.float64)
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    tensors = [
        x,
        torch.randn(out_features, dtype=torch.float64) if with_bias else None,
        torch.randn(r, in_features, dtype=torch.float64),
        torch.randn(out_features, r, dtype=torch.float64),
    ]
    fused_inputs = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    plain_inputs = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fused.LinearWithLora.apply(
        fused_inputs[0], weight, fused_inputs[1], *fused_inputs[2:], scaling, p, seed
    )
    x_plain, bias_plain, a_plain, b_plain = plain_inputs
    expected = plain(
        torch.nn.functional.linear(x_plain, weight, bias_plain), x_plain, a_plain, b_plain, scaling, p, seed
    )
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(expected)
    out.backward(upstream)
    expected.backward(upstream)
    for got, want in zip(fused_inputs, plain_inputs):
        if want is not None:
            torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_node_with_the_base_passes_gradcheck(p):
    torch.manual_seed(0)
    weight = torch.randn(5, 4, dtype=torch.float64)
    inputs = [
        torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(5, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
    ]

    def node(x, bias, a, b):
        return fused.LinearWithLora.apply(x, weight, bias, a, b, 1.5, p, 99)

    assert torch.autograd.gradcheck(node, inputs)


def test_a_layer_with_a_trained_bias_and_a_hooked_base_trains_as_the_plain_modules(monkeypatch):
    """bias="all" trains the base bias through the node; a forward hook on the base keeps the plain path."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    config = LoraConfig(r=2, target_modules=["0", "2"], bias="all", init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config)
    x = torch.randn(4, 6, requires_grad=True)
    seen = []
    model.get_base_model()[2].base_layer.register_forward_hook(lambda *args: seen.append(1))

    def run():
        model.zero_grad()
        x.grad = None
        model(x).square().sum().backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}
        return grads, x.grad.clone()

    fused_grads, fused_x = run()
    assert len(seen) == 1  # the hooked base layer ran itself
    monkeypatch.setattr(LoraLayer, "use_fused_linear", False)
    plain_grads, plain_x = run()
    assert any("bias" in name for name in plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], msg=name)
    torch.testing.assert_close(fused_x, plain_x)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_fused_node_passes_gradcheck(p):
    torch.manual_seed(0)
    inputs = [
        torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *t: fused.LoraLinear.apply(*t, 1.5, p, 1234), inputs)


def lora_llama(dropout: float):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False
    )
    return get_peft_model(tiny_llama(seed=0), config).train()


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_lora_model_trains_the_same_with_and_without_the_fused_node(monkeypatch):
    model = lora_llama(dropout=0.0)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    fused_loss, fused_grads = loss_and_grads(model, ids)
    monkeypatch.setattr(LoraLayer, "use_fused_linear", False)
    plain_loss, plain_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():
        plain_logits = model(input_ids=ids).logits
        monkeypatch.setattr(LoraLayer, "use_fused_linear", True)
        torch.testing.assert_close(model(input_ids=ids).logits, plain_logits, rtol=1e-5, atol=1e-6)


def test_fused_dropout_repeats_under_the_same_seed_and_differs_from_no_dropout():
    model = lora_llama(dropout=0.5)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    first = model(input_ids=ids).logits
    torch.manual_seed(7)
    again = model(input_ids=ids).logits
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    model.eval()
    assert not torch.allclose(model(input_ids=ids).logits, first)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    p=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**62),
)
def test_dropout_keep_gives_one_repeatable_mask_of_the_input_shape(shape, p, seed):
    like = torch.empty(shape)
    keep = fused.dropout_keep(like, p, seed)
    assert keep.shape == like.shape and keep.dtype == torch.bool
    assert torch.equal(keep, fused.dropout_keep(like.double(), p, seed)), "the dtype changes no element"


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropout_keep_keeps_each_element_with_probability_one_minus_p(p):
    count = 2**20
    rates = [fused.dropout_keep(torch.empty(count), p, seed).double().mean().item() for seed in range(4)]
    spread = (p * (1 - p) / count) ** 0.5  # one standard deviation of the rate
    assert all(abs(rate - (1 - p)) < 5 * spread for rate in rates), rates
    assert len(set(rates)) == len(rates), "other seeds, other masks"
    # neighbouring elements are independent (four of them share one 64-bit draw)
    keep = fused.dropout_keep(torch.empty(count), p, 0).view(-1, 4).double()
    pairs = (keep[:, 0] * keep[:, 1]).mean().item()
    assert abs(pairs - (1 - p) ** 2) < 5 * spread


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps while the model's loss is built."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return sum(storages.values())


def test_with_dropout_the_fused_node_keeps_no_mask_and_no_dropped_copy(monkeypatch):
    """Plain LoRA keeps, per adapted layer, a dropped copy of its input and the mask: 5 bytes an input
    element. The fused node keeps the input itself (4 bytes, shared by layers that read one input: q, k
    and v; gate and up), so on a Llama block it keeps about half of what plain LoRA adds to the base."""
    model = lora_llama(dropout=0.1)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    fused_bytes = saved_bytes(model, ids)
    with model.disable_adapter():
        base_bytes = saved_bytes(model, ids)
    monkeypatch.setattr(LoraLayer, "use_fused_linear", False)
    plain_bytes = saved_bytes(model, ids)
    assert base_bytes < fused_bytes < plain_bytes
    assert fused_bytes - base_bytes <= 0.6 * (plain_bytes - base_bytes)


def test_bare_linear_bases_run_in_the_node_with_the_base(monkeypatch):
    calls = []
    original = fused.LinearWithLora.apply
    monkeypatch.setattr(fused.LinearWithLora, "apply", lambda *args: calls.append(1) or original(*args))
    model = lora_llama(dropout=0.0)
    model(input_ids=torch.randint(0, 128, (1, 4))).logits.sum().backward()
    assert len(calls) == sum(1 for _, layer in model.adapter_layers() if isinstance(layer, LoraLayer))


# --- under torch.autocast ---------------------------------------------------------------------------
# Bounds on ‖actual − expected‖ / ‖expected‖ for two computations that each round to the autocast dtype.
# bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ≈ 2e-3), fp16 11 (u = 2^-12 ≈ 2.4e-4). A gradient
# of a tiny Llama's adapter goes through a few dozen rounded products; measured over seeds here, the
# worst tensor was 30u off in bf16 (0.06) and 58u in fp16 (0.014), so the bounds are 60u and 120u. A
# wrong mask or a dropped term is off by O(1) (another dropout seed: 2.1).
AUTOCAST_RTOL = {torch.bfloat16: 0.12, torch.float16: 0.03}


def assert_close_in_norm(actual, expected, rtol, what):
    error = (
        (actual.detach().double() - expected.detach().double()).norm() / expected.detach().double().norm()
    ).item()
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol}"


def autocast_loss_and_grads(model, ids, dtype, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_under_autocast_the_fused_node_trains_as_the_plain_modules(monkeypatch, dtype):
    model = lora_llama(dropout=0.0)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    calls = []
    original = fused.LinearWithLora.apply
    monkeypatch.setattr(fused.LinearWithLora, "apply", lambda *args: calls.append(1) or original(*args))
    fused_loss, fused_grads = autocast_loss_and_grads(model, ids, dtype)
    assert calls, "the fused node did not run under autocast"
    monkeypatch.setattr(LoraLayer, "use_fused_linear", False)
    plain_loss, plain_grads = autocast_loss_and_grads(model, ids, dtype)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    assert_close_in_norm(fused_loss, plain_loss, AUTOCAST_RTOL[dtype], "loss")
    for name in plain_grads:
        assert fused_grads[name].dtype == torch.float32, f"{name}: the float32 adapter's gradient is float32"
        assert_close_in_norm(fused_grads[name], plain_grads[name], AUTOCAST_RTOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_under_autocast_dropout_drops_what_the_float32_run_drops(dtype):
    """The mask does not depend on the dtype autocast casts the input to: the same seed, the same elements."""
    model = lora_llama(dropout=0.5)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    model.zero_grad()
    full_loss = model(input_ids=ids, labels=ids).loss
    full_loss.backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    amp_loss, amp_grads = autocast_loss_and_grads(model, ids, dtype, seed=11)
    assert_close_in_norm(amp_loss, full_loss, AUTOCAST_RTOL[dtype], "loss")
    for name in full_grads:
        assert_close_in_norm(amp_grads[name], full_grads[name], AUTOCAST_RTOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "result_dtype", [torch.float32, None], ids=["float32-base-output", "autocast-base-output"]
)
def test_node_under_autocast_follows_autocasts_rules(dtype, result_dtype):
    """Inputs cast to the autocast dtype, products in it; a base output of another dtype (a quantized base
    returns float32) keeps its dtype and gets the update cast to it, as the plain path's ``y + lora.to(y.dtype)``."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(6, 3, requires_grad=True)
    result = torch.randn(2, 5, 6, dtype=result_dtype or dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = fused.lora_linear(result, x, a, b, 0.5)
        expected = result + ((x @ a.T) @ b.T * 0.5).to(result.dtype)  # matmuls autocast to `dtype`
    assert out.dtype == result.dtype == expected.dtype
    assert_close_in_norm(out, expected, AUTOCAST_RTOL[dtype] / 4, "output")
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (result, a, b), upstream)
    want = torch.autograd.grad(expected, (result, a, b), upstream)
    for name, g, w in zip(("result", "A", "B"), got, want):
        assert g.dtype == w.dtype, name
        assert_close_in_norm(g, w, AUTOCAST_RTOL[dtype] / 4, name)


def test_tensor_scales_train_as_float_scales_do():
    """After prepare_model_for_compiled_hotswap (no padding) the nodes get 0-dim tensor scales: the same
    loss and gradients in float32; under bf16 autocast as close to float32 as with float scales."""
    from peftkit import prepare_model_for_compiled_hotswap

    config = LoraConfig(r=4, lora_alpha=7, target_modules="all-linear", init_lora_weights=False)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))

    def step(prepare, amp=None):
        model = get_peft_model(tiny_llama(), config).train()
        if prepare:
            prepare_model_for_compiled_hotswap(model)
            assert all(
                isinstance(layer.scaling["default"], torch.Tensor) for _, layer in model.adapter_layers()
            )
        with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    def worst_error(run, reference):
        """The largest gradient error, relative to that gradient's largest entry."""
        return max((got - want).abs().max() / want.abs().max() for got, want in zip(run[1], reference[1]))

    reference, prepared = step(False), step(True)
    torch.testing.assert_close(prepared[0], reference[0], rtol=1e-5, atol=1e-6)
    assert worst_error(prepared, reference) < 1e-5
    float_scale_bf16, tensor_scale_bf16 = step(False, torch.bfloat16), step(True, torch.bfloat16)
    torch.testing.assert_close(tensor_scale_bf16[0], reference[0], rtol=1e-2, atol=1e-2)
    assert worst_error(tensor_scale_bf16, reference) < 1.5 * worst_error(float_scale_bf16, reference)
