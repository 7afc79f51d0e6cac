"""The prefix module on a model: shapes as PEFT derives them, training, loading, and every error it raises."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import peftkit
import peftkit_prefix_tuning
import pytest
import torch
from peftkit import AdapterLoadError, ConfigError, plugins
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_plain, tiny_t5
from peftkit_prefix_tuning import PrefixTuningConfig, plugin
from safetensors.torch import load_file, save_file

IDS = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(0))


def prefix(task="CAUSAL_LM", n=3, **kwargs):
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=n, **kwargs)


def peft_model(base, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about deprecated transformers attributes
        return peft.get_peft_model(base, peft.PrefixTuningConfig(**kwargs))


# --- registration, shapes and the forward pass ----------------------------------------------------
def test_the_method_is_registered_with_prefix_tuning_s_capabilities():
    spec = plugins.method_named("prefix_tuning")
    assert (spec.peft_type, spec.family, spec.key_root) == ("PREFIX_TUNING", "prompt", "base_model.")
    assert spec.capabilities() == {
        "mergeable": False,
        "supports_multiple_active": False,
        "needs_tokenizer": False,
    }
    # discovery reads the installed distribution's version, which must be the package's own
    assert (spec.distribution, spec.version) == ("peftkit-prefix-tuning", peftkit_prefix_tuning.__version__)
    assert peftkit.PrefixTuningConfig is PrefixTuningConfig


SHAPE_CASES = {
    # grouped-query attention: 4 query heads of 8, 2 key/value heads -> keys and values 16 wide
    "llama": (tiny_llama, "CAUSAL_LM", dict(token_dim=16, num_attention_heads=2, num_layers=2)),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", dict(token_dim=32, num_attention_heads=4, num_layers=2)),
    "bert": (tiny_bert, "SEQ_CLS", dict(token_dim=32, num_attention_heads=4, num_layers=2)),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", dict(token_dim=32, num_attention_heads=4, num_layers=2)),
}


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projected"])
@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_shape_fields_and_tensors_are_peft_s(case, projection):
    build, task, expected = SHAPE_CASES[case]
    ours = peftkit.get_peft_model(build(), prefix(task, prefix_projection=projection))
    theirs = peft_model(build(), task_type=task, num_virtual_tokens=3, prefix_projection=projection)
    config, their_config = ours.peft_config["default"], theirs.peft_config["default"]
    for name, value in expected.items():
        assert getattr(config, name) == getattr(their_config, name) == value, name
    assert config.encoder_hidden_size == their_config.encoder_hidden_size == expected["token_dim"]
    assert config.num_transformer_submodules == their_config.num_transformer_submodules
    mine = dict(ours.prompt_modules["default"].named_parameters())
    their_params = dict(theirs.prompt_encoder["default"].named_parameters())
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in their_params.items()}
    assert ours.prompt_modules["default"]().shape == (3, 2 * 2 * expected["token_dim"])


def test_outputs_keep_the_input_length_and_the_cache_holds_the_prefix():
    model = peftkit.get_peft_model(tiny_llama(), prefix(n=4))
    out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    assert out.logits.shape == (2, 5, 128)
    assert out.past_key_values.get_seq_length() == 4 + 5
    keys = out.past_key_values.layers[1].keys
    assert keys.shape == (2, 2, 4 + 5, 8)  # batch, key/value heads, prefix + tokens, head width
    # the cached prefix is layer 1's block of the prefix: block 2 (keys), split into 2 heads of 8
    layer_one_keys = model.prompt_modules["default"]()[:, 2 * 16 : 3 * 16].view(4, 2, 8).transpose(0, 1)
    torch.testing.assert_close(keys[0, :, :4], layer_one_keys, rtol=0, atol=0)


@pytest.mark.parametrize(("build", "task"), [(tiny_llama, "CAUSAL_LM"), (tiny_bert, "SEQ_CLS")])
def test_without_an_attention_mask_the_model_gets_one_covering_prefix_and_tokens(build, task):
    # a compiled model (transformers 5.17) sizes its mask by the mask it is given, else by the tokens alone
    model = peftkit.get_peft_model(build(), prefix(task=task, n=4))
    inputs = plugins.transform_inputs(model, model.peft_config["default"], "default", dict(input_ids=IDS))
    assert torch.equal(inputs["attention_mask"], torch.ones(2, 4 + 5, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits, model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
        )


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projected"])
def test_zero_init_starts_the_prefix_at_zero_as_peft_does(projection):
    model = peftkit.get_peft_model(tiny_gpt2(), prefix(init_weights="zero", prefix_projection=projection))
    assert torch.count_nonzero(model.prompt_modules["default"]()) == 0
    theirs = peft_model(
        tiny_gpt2(),
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        init_weights="zero",
        prefix_projection=projection,
    )
    zeros = {k for k, v in theirs.prompt_encoder["default"].named_parameters() if not v.any()}
    assert {k for k, v in model.prompt_modules["default"].named_parameters() if not v.any()} == zeros


def test_the_prefix_follows_the_base_model_s_dtype():
    model = peftkit.get_peft_model(tiny_llama().to(torch.bfloat16), prefix())
    assert model.prompt_modules["default"].embedding.weight.dtype == torch.float32  # trains in float32
    out = model(input_ids=IDS)
    assert out.logits.dtype == torch.bfloat16
    assert out.past_key_values.layers[0].keys.dtype == torch.bfloat16


# --- inputs as PEFT rewrites them ------------------------------------------------------------------
def trained_pair(build, task, tmp_path):
    base = build()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(peftkit.get_peft_model(base, prefix(task)), scale=0.5)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ours, peft.PeftModel.from_pretrained(pristine, tmp_path)


def test_causal_lm_labels_and_position_ids_give_peft_s_loss_and_logits(tmp_path):
    ours, theirs = trained_pair(tiny_llama, "CAUSAL_LM", tmp_path)
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    batch = dict(input_ids=IDS, attention_mask=mask, labels=IDS.masked_fill(mask == 0, -100))
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # shifted past the prefix by both
    with torch.no_grad():
        mine, their_out = ours(**batch), theirs(**batch)
    torch.testing.assert_close(mine.loss, their_out.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.logits, their_out.logits, rtol=1e-5, atol=1e-5)
    without_positions = ours(**{k: v for k, v in batch.items() if k != "position_ids"}).logits
    assert not torch.allclose(without_positions[1], mine.logits[1])  # row 1 is padded: positions matter


def test_seq2seq_loss_equals_peft_s(tmp_path):
    ours, theirs = trained_pair(tiny_t5, "SEQ_2_SEQ_LM", tmp_path)
    batch = dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS[:, :3].contiguous())
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).loss, theirs(**batch).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "task"),
    [(tiny_llama, "CAUSAL_LM"), (lambda: tiny_bert().bert, "FEATURE_EXTRACTION")],
    ids=["causal-lm", "feature-extraction"],
)
def test_token_type_ids_are_dropped_with_a_warning_where_peft_drops_them(build, task):
    model = peftkit.get_peft_model(build(), prefix(task))
    name = "logits" if task == "CAUSAL_LM" else "last_hidden_state"
    plain = getattr(model(input_ids=IDS), name)
    with pytest.warns(UserWarning, match=rf"prefix tuning ignores token_type_ids for task {task} \(as PEFT"):
        dropped = getattr(model(input_ids=IDS, token_type_ids=torch.ones_like(IDS)), name)
    torch.testing.assert_close(dropped, plain, rtol=0, atol=0)


def test_classification_keeps_token_type_ids():
    model = peftkit.get_peft_model(tiny_bert(), prefix("SEQ_CLS"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        typed = model(input_ids=IDS, token_type_ids=torch.ones_like(IDS)).logits
    assert not torch.allclose(typed, model(input_ids=IDS).logits)


# --- training ------------------------------------------------------------------------------------
def test_a_prefix_tuned_bert_classifier_s_loss_falls():
    torch.manual_seed(0)
    model = peftkit.get_peft_model(tiny_bert(), prefix("SEQ_CLS", n=8, prefix_projection=True))
    ids = torch.randint(2, 128, (16, 8))
    labels = (ids[:, 0] > 64).long()  # the class is read off the first token
    mask = torch.ones_like(ids)
    mask[::2, -3:] = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    module = model.prompt_modules["default"]
    assert {id(p) for p in module.parameters()} <= {id(p) for p in trainable}
    before = module().detach().clone()
    optimizer = torch.optim.AdamW(trainable, lr=1e-1)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    assert not torch.allclose(module().detach(), before)  # the prefix itself moved


def test_gradient_checkpointing_is_refused_at_set_up():
    base = tiny_llama()
    base.activation_checkpointing_enable()
    with pytest.raises(ConfigError, match=r"prefix tuning does not work with gradient checkpointing"):
        peftkit.get_peft_model(base, prefix())


def test_gradient_checkpointing_turned_on_later_is_refused_when_training():
    model = peftkit.get_peft_model(tiny_llama(), prefix())
    model.get_base_model().activation_checkpointing_enable()
    model.eval()
    model(input_ids=IDS)  # inference keeps the cache: fine
    model.train()
    with pytest.raises(
        ConfigError, match=r"turn it off on the base model first \(activation_checkpointing_disable\(\)"
    ):
        model(input_ids=IDS)


def test_a_model_without_a_kv_cache_is_refused():
    with pytest.raises(
        ConfigError, match=r"prefix tuning needs a model that takes past_key_values .* TinyPlainModel does"
    ):
        peftkit.get_peft_model(tiny_plain(), prefix())


def test_a_model_without_a_config_needs_the_shape_fields_set():
    class Wrapped(torch.nn.Module):  # a model whose config is not reachable
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()

        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return self.inner(input_ids=input_ids, past_key_values=past_key_values, **kwargs)

    with pytest.raises(
        ConfigError,
        match=r"PrefixTuningConfig.num_layers is None and the base model's config has "
        r"none of num_hidden_layers, num_layers, n_layer to take it from; set num_layers",
    ):
        peftkit.get_peft_model(Wrapped(), prefix())
    model = peftkit.get_peft_model(Wrapped(), prefix(num_layers=2, token_dim=16, num_attention_heads=2))
    assert model(input_ids=IDS).logits.shape == (2, 5, 128)


# --- saving and loading --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "task", "heads"),
    [
        (tiny_llama, "CAUSAL_LM", []),
        (tiny_bert, "SEQ_CLS", ["base_model.classifier.bias", "base_model.classifier.weight"]),
        (tiny_t5, "SEQ_2_SEQ_LM", []),
    ],
)
@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projected"])
def test_files_hold_peft_s_keys_shapes_and_config(build, task, heads, projection, tmp_path):
    base = build()
    pristine = copy.deepcopy(base)
    settings = dict(task_type=task, num_virtual_tokens=3, prefix_projection=projection)
    ours = peftkit.get_peft_model(base, PrefixTuningConfig(**settings))
    ours.save_pretrained(tmp_path / "ours")
    peft_model(pristine, **settings).save_pretrained(tmp_path / "theirs")

    mine, theirs = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "theirs"))
    assert sorted(mine) == sorted(theirs) == sorted(["prompt_embeddings", *heads])
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    torch.testing.assert_close(mine["prompt_embeddings"], ours.prompt_modules["default"]().detach())

    our_config, their_config = (
        json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")
    )
    for key in (
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "encoder_hidden_size",
        "prefix_projection",
        "init_weights",
        "inference_mode",
    ):
        assert our_config[key] == their_config[key], key


def test_a_projected_adapter_loaded_to_train_goes_on_from_its_prefix(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(peftkit.get_peft_model(base, prefix(prefix_projection=True)), scale=0.5)
    expected = ours(input_ids=IDS).logits
    ours.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"saved as its prefix, without the prefix_projection MLP"):
        loaded = peftkit.PeftModel.from_pretrained(pristine, tmp_path, is_trainable=True)
    module = loaded.prompt_modules["default"]
    assert module.transform is None and module.embedding.weight.requires_grad
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "prompt_modules.default.embedding.weight"
    ]
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=1e-6, atol=1e-6)


def test_loading_an_adapter_with_another_number_of_virtual_tokens_names_both_shapes(tmp_path):
    peftkit.get_peft_model(tiny_llama(), prefix(n=3)).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"num_virtual_tokens": 4}))
    with pytest.raises(
        AdapterLoadError,
        match=r"tensor 'prompt_embeddings' has shape \(3, 64\) in the adapter file but \(4, 64\) in the model",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("left", [{}, {"prompt_embedding": torch.zeros(3, 64)}], ids=["empty", "misnamed"])
def test_loading_an_adapter_file_without_prompt_embeddings_fails_clearly(left, tmp_path):
    peftkit.get_peft_model(tiny_llama(), prefix()).save_pretrained(tmp_path)
    save_file(left, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        AdapterLoadError,
        match=r"the adapter file has no tensor 'prompt_embeddings', which every prefix tuning adapter holds",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# --- generation steps ----------------------------------------------------------------------------
def test_a_generation_step_takes_one_attention_mask_per_step():
    model = peftkit.get_peft_model(tiny_llama(), prefix())
    config = model.peft_config["default"]
    mask = torch.ones_like(IDS)
    step = dict(input_ids=IDS, attention_mask={"full_attention": mask})
    made = plugin.peftkit_prepare_generation_step(model, config, "default", step)
    assert made["attention_mask"].shape == (2, 3 + 5)
    assert made["past_key_values"].get_seq_length() == 3
    step["attention_mask"] = {"full_attention": mask, "sliding_attention": mask}
    with pytest.raises(
        ValueError,
        match=r"prefix tuning can extend one attention mask per generation step, got 2 "
        r"\(full_attention, sliding_attention\)",
    ):
        plugin.peftkit_prepare_generation_step(model, config, "default", step)


def test_generate_for_a_classifier_is_left_to_the_base_model():
    model = peftkit.get_peft_model(tiny_bert(), prefix("SEQ_CLS"))
    config = model.peft_config["default"]
    assert plugin.peftkit_prepare_generation(model, config, "default", {"input_ids": IDS}) is None
    assert plugin.peftkit_prepare_generation_step(model, config, "default", {"input_ids": IDS}) is None
