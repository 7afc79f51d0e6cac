"""``PeftModel.forward`` reads, to ``inspect.signature`` and to what wraps it, as its base model's forward.

transformers' ``Trainer`` keeps the dataset columns, passes loss arguments and finds label names by
reading ``forward``'s signature; accelerate's mixed precision and torch.compile wrap or trace ``forward``.
"""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from peftkit import PeftModel, get_peft_model
from peftkit.forward_signature import with_adapter_names
from peftkit.testing.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_plain, tiny_t5
from peftkit_lora import LoraConfig

IDS = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))
BASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),
    "bert": (tiny_bert, ["query", "value"]),
    "t5": (tiny_t5, ["q", "v"]),
    "plain": (tiny_plain, ["fc1"]),
}


def wrapped(name: str) -> PeftModel:
    build, targets = BASES[name]
    return get_peft_model(build(), LoraConfig(r=2, target_modules=targets))


def described(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("name", list(BASES))
def test_the_signature_is_the_base_models_plus_adapter_names_and_task_ids(name):
    model = wrapped(name)
    base = inspect.signature(model.get_base_model().forward)
    ours = inspect.signature(model.forward)

    base_parameters = described(base)
    keyword_catchall = [p for p in base_parameters if p[1] is inspect.Parameter.VAR_KEYWORD]
    # every base parameter, in order; adapter_names and task_ids (MultiTask's) keyword-only with default
    # None, before any **kwargs
    assert [p for p in described(ours) if p[0] not in ("adapter_names", "task_ids")] == base_parameters
    for added in ("adapter_names", "task_ids"):
        assert ours.parameters[added].kind is inspect.Parameter.KEYWORD_ONLY
        assert ours.parameters[added].default is None
    assert list(ours.parameters)[-1] == (keyword_catchall[0][0] if keyword_catchall else "task_ids")
    assert ours.return_annotation == base.return_annotation


def test_the_signature_follows_the_base_model_when_it_is_replaced():
    model = wrapped("llama")
    assert "attention_mask" in inspect.signature(model.forward).parameters
    model.base_model.model = tiny_plain()
    assert list(inspect.signature(model.forward).parameters) == ["input_ids", "adapter_names", "task_ids"]


def test_read_on_the_class_forward_names_labels_as_peft_task_models_do():
    from transformers.utils import find_labels

    # transformers' find_labels reads the class, which cannot know a model's base; PEFT's task models name labels
    assert find_labels(PeftModel) == ["labels"]
    parameters = inspect.signature(PeftModel.forward).parameters
    assert list(parameters) == ["self", "args", "adapter_names", "task_ids", "labels", "kwargs"]


def test_calls_go_through_unchanged_positional_or_keyword():
    model = wrapped("llama")
    with torch.no_grad():
        by_keyword = model(input_ids=IDS).logits
        by_position = model(IDS).logits
        through_forward = model.forward(IDS).logits
        base_path = model.get_base_model()(IDS).logits
    torch.testing.assert_close(by_keyword, by_position, rtol=0, atol=0)
    torch.testing.assert_close(through_forward, by_position, rtol=0, atol=0)
    # LoRA's B starts at zero, so the adapted model computes the base model's outputs
    torch.testing.assert_close(by_keyword, base_path, rtol=0, atol=0)


def test_positional_arguments_bind_by_the_base_forwards_names_read_once(monkeypatch):
    import peftkit.model

    model = wrapped("llama")
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0  # a mask that changes the outputs, so binding it to another name would show
    with torch.no_grad():
        by_keyword = model(input_ids=IDS, attention_mask=mask).logits
        model(IDS, mask)  # the names are looked up here, once for this forward function
        reads = []
        signature = inspect.signature
        # inspect.signature is the module's, shared with torch and transformers (transformers 4's masks read
        # signatures under vmap), so only reads of the base model's forward count
        forward = model.get_base_model().forward.__func__

        def recording_signature(function, **options):
            if getattr(function, "__func__", function) is forward:
                reads.append(function)
            return signature(function, **options)

        monkeypatch.setattr(peftkit.model.inspect, "signature", recording_signature)
        by_position = model(IDS, mask).logits
        unmasked = model(IDS).logits
    torch.testing.assert_close(by_position, by_keyword, rtol=0, atol=0)
    assert not torch.equal(unmasked, by_position)
    assert reads == [], "a bound forward's positional names are not read again on every call"


def test_a_forward_replaced_by_a_plain_function_binds_its_own_names():
    model = wrapped("plain")
    base = model.get_base_model()
    calls = []
    original = base.forward

    def forward(ids, scale=1.0):  # an instance attribute, as a wrapping library sets one
        calls.append(scale)
        return original(ids) * scale

    base.forward = forward
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, 2.0), 2.0 * original(IDS), rtol=0, atol=0)
    assert calls == [2.0]


def test_forward_reads_as_a_bound_method():
    model = wrapped("llama")
    assert model.forward.__self__ is model
    assert model.forward == model.forward
    assert model.forward != wrapped("llama").forward
    assert model.forward.__name__ == "forward"
    # __func__ is a function that, called with the model first, runs forward, and is signed like it plus self
    function = model.forward.__func__
    assert list(inspect.signature(function).parameters)[:2] == ["self", "input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(function(model, IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_copies_and_pickles_read_their_own_base_model():
    model = wrapped("llama")
    with torch.no_grad():
        expected = model(IDS).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert inspect.signature(other.forward) == inspect.signature(model.forward)
        assert other.forward.__self__ is other
        with torch.no_grad():
            torch.testing.assert_close(other(IDS).logits, expected, rtol=0, atol=0)
        other.base_model.model = tiny_plain()
        assert list(inspect.signature(other.forward).parameters) == ["input_ids", "adapter_names", "task_ids"]
        assert "attention_mask" in inspect.signature(model.forward).parameters


def test_adapter_names_and_task_ids_are_added_once_and_before_the_keyword_catchall():
    def base(x, *rest, y=1, **extra): ...

    def already(x, adapter_names=None, task_ids=None): ...

    assert list(with_adapter_names(inspect.signature(base)).parameters) == [
        "x",
        "rest",
        "y",
        "adapter_names",
        "task_ids",
        "extra",
    ]
    assert with_adapter_names(inspect.signature(already)) == inspect.signature(already)


@pytest.fixture
def accelerate():
    """accelerate, its process-wide state reset: a Trainer run before may have set another precision."""
    accelerate = pytest.importorskip("accelerate")
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    yield accelerate
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_mixed_precision_keeps_the_signature_and_unwraps_to_a_working_forward(accelerate):
    model = wrapped("llama")
    expected_signature = inspect.signature(model.forward)
    with torch.no_grad():
        expected = model(IDS).logits

    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.prepare(model)
    # accelerate rebinds forward.__func__ with autocast around it, and converts outputs back to float32
    assert inspect.signature(prepared.forward) == expected_signature
    with torch.no_grad():
        under_autocast = prepared(IDS).logits
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=0.05, atol=0.05)

    unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    assert inspect.signature(unwrapped.forward) == expected_signature
    with torch.no_grad():
        torch.testing.assert_close(unwrapped(IDS).logits, expected, rtol=0, atol=0)


def test_torch_compile_traces_forward_whole_and_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = wrapped("llama")
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for seed in range(3):
        ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(seed))
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)
    assert counter.frame_count == 1


def test_a_bound_forward_hashes_before_its_slots_are_set():
    from peftkit.forward_signature import BoundForward

    # torch 2.11's dynamo builds the object while tracing and hashes it before it sets the slots
    unset = BoundForward.__new__(BoundForward)
    assert hash(unset) == hash(BoundForward.__new__(BoundForward))
    assert unset != wrapped("plain").forward
    model = wrapped("plain")
    assert hash(model.forward) == hash(model.forward)
