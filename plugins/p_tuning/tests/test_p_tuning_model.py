"""The prompt encoder on a model: registration, training, loading to train on, and load errors."""

from __future__ import annotations

import copy
import json

import peftkit
import peftkit_p_tuning
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import AdapterLoadError, ConfigError, plugins
from peftkit.testing.models import randomize_trainable, tiny_llama
from peftkit_p_tuning import PromptEncoderConfig
from peftkit_p_tuning.encoder import unrolled_lstm

IDS = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(0))


def p_tuning(task="CAUSAL_LM", n=3, **kwargs):
    return PromptEncoderConfig(task_type=task, num_virtual_tokens=n, **kwargs)


def test_the_method_is_registered_with_p_tuning_s_capabilities():
    spec = plugins.method_named("p_tuning")
    assert (spec.peft_type, spec.family, spec.key_root) == ("P_TUNING", "prompt", "base_model.")
    assert spec.capabilities() == {
        "mergeable": False,
        "supports_multiple_active": False,
        "needs_tokenizer": False,
    }
    assert (spec.distribution, spec.version) == ("peftkit-p-tuning", peftkit_p_tuning.__version__)
    assert peftkit.PromptEncoderConfig is PromptEncoderConfig


def test_causal_lm_sees_the_encoder_s_virtual_tokens_before_the_input():
    model = peftkit.get_peft_model(tiny_llama(), p_tuning(n=4, encoder_reparameterization_type="LSTM"))
    module = model.prompt_modules["default"]
    assert module.virtual_tokens().shape == (4, 32)
    assert model(input_ids=IDS).logits.shape == (2, 4 + 5, 128)
    assert model.peft_config["default"].encoder_hidden_size == 32  # the embedding width when None
    # the embeddings alone are not the virtual tokens: the encoder transforms them
    assert not torch.allclose(module.virtual_tokens(), module.embedding.weight)


def test_lstm_dropout_acts_only_while_training():
    model = peftkit.get_peft_model(
        tiny_llama(),
        p_tuning(encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.5),
    )
    module = model.prompt_modules["default"]
    assert module.lstm_head.dropout == 0.5
    model.eval()
    torch.testing.assert_close(module.virtual_tokens(), module.virtual_tokens(), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(module.virtual_tokens(), module.virtual_tokens())


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_a_p_tuned_causal_lm_s_loss_falls(encoder):
    """Teach a frozen causal LM to answer every prompt with token 7 through the encoder's virtual tokens."""
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        tiny_llama(initializer_range=0.2), p_tuning(n=8, encoder_reparameterization_type=encoder)
    )
    prompts = torch.randint(10, 128, (16, 6))
    batch = torch.cat([prompts, torch.full((16, 1), 7)], dim=1)
    labels = batch.clone()
    labels[:, :-1] = -100
    module = model.prompt_modules["default"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in module.parameters()}
    before = module.virtual_tokens().detach().clone()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.allclose(module.virtual_tokens().detach(), before)


def test_an_adapter_loaded_to_train_goes_on_from_its_virtual_tokens(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(peftkit.get_peft_model(base, p_tuning()), scale=0.5)
    expected = ours(input_ids=IDS).logits
    ours.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"saved as its virtual tokens, without the prompt encoder"):
        loaded = peftkit.PeftModel.from_pretrained(pristine, tmp_path, is_trainable=True)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "prompt_modules.default.embedding.weight"
    ]
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=1e-6, atol=1e-6)


def test_a_token_dim_other_than_the_embedding_width_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"PromptEncoderConfig.token_dim must be the width of the model's word embeddings \(32\), got 16",
    ):
        peftkit.get_peft_model(tiny_llama(), p_tuning(token_dim=16))


def test_loading_an_adapter_with_another_number_of_virtual_tokens_names_both_shapes(tmp_path):
    peftkit.get_peft_model(tiny_llama(), p_tuning(n=3)).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"num_virtual_tokens": 4}))
    with pytest.raises(
        AdapterLoadError,
        match=r"tensor 'prompt_embeddings' has shape \(3, 32\) in the adapter file but \(4, 32\) in the model",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_loading_an_adapter_file_without_prompt_embeddings_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    peftkit.get_peft_model(tiny_llama(), p_tuning()).save_pretrained(tmp_path)
    save_file({}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        AdapterLoadError,
        match=r"the adapter file has no tensor 'prompt_embeddings', which every P-tuning adapter holds",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("encoder", ["LSTM", "MLP"])
def test_the_encoder_trains_under_autocast_as_in_float32(dtype, encoder):
    """The encoder runs in float32 with autocast off (torch's CPU LSTM has no float16 kernel), so its
    virtual tokens are the float32 ones bit for bit, and a mixed-precision step trains it."""
    model = peftkit.get_peft_model(tiny_llama(), p_tuning(encoder_reparameterization_type=encoder))
    module = model.prompt_modules["default"]
    tokens = module.virtual_tokens().detach()
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(module.virtual_tokens(), tokens)
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(
        g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads
    )
    assert any(g.abs().sum() > 0 for g in grads)


@settings(max_examples=20, deadline=None)
@given(
    layers=st.integers(1, 3),
    width=st.integers(1, 12),
    hidden=st.integers(1, 8),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_the_unrolled_lstm_computes_what_nn_lstm_computes(layers, width, hidden, tokens, seed):
    """Compiled, the encoder runs the LSTM's equations (torch.compile cannot trace nn.LSTM): the same
    values and gradients as torch's kernel, to float32 rounding."""
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(width, hidden, num_layers=layers, bidirectional=True, batch_first=True).eval()
    x = torch.randn(1, tokens, width, dtype=torch.float64, requires_grad=True)
    lstm = lstm.double()
    expected = lstm(x)[0]
    got = unrolled_lstm(dict(lstm.named_parameters()), x, layers)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [x, *lstm.parameters()], upstream)
    have = torch.autograd.grad(got, [x, *lstm.parameters()], upstream)
    for w, h in zip(want, have):
        torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-12)


def test_a_compiled_lstm_encoder_is_one_graph_with_the_eager_outputs():
    model = peftkit.get_peft_model(tiny_llama(), p_tuning(encoder_reparameterization_type="LSTM"))
    model.eval()
    with torch.no_grad():
        eager = model(input_ids=IDS).logits
        torch._dynamo.reset()
        compiled = torch.compile(lambda ids: model(input_ids=ids).logits, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(IDS), eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_the_lstm_weights_the_compiled_path_reads_follow_the_module():
    """They are kept outside the module tree (torch.compile will not touch an nn.LSTM module): they must
    stay the module's own parameters through copies and moves that make new ones."""
    with torch.device("meta"):
        model = peftkit.get_peft_model(tiny_llama(), p_tuning(encoder_reparameterization_type="LSTM"))
    model.to_empty(device="cpu")  # new parameters in place of the meta ones
    copies = {"to_empty": model, "deepcopy": copy.deepcopy(model)}
    for how, candidate in copies.items():
        encoder = candidate.prompt_modules["default"]
        remembered = encoder.__dict__["_lstm_weights"]
        assert remembered.keys() == dict(encoder.lstm_head.named_parameters()).keys()
        for name, param in encoder.lstm_head.named_parameters():
            assert remembered[name] is param, f"after {how}: {name} is not the module's parameter"
