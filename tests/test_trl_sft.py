"""TRL's SFTTrainer with peftkit models: peftkit.integrations.trl.SFTTrainer.

TRL treats a model as PEFT's only if it is PEFT's own class; these tests train a peftkit model through
TRL's supervised fine-tuning trainer and check what TRL does differently for PEFT models: adapter-only
checkpoints and resuming, its fused LM head on the base model (the loss it computes equals the model's
own), ``peft_config=`` with peftkit's configs, gradient checkpointing, a 4-bit base (QLoRA), the model card.
"""

from __future__ import annotations

import itertools
import json

import datasets
import peft
import pytest
import torch
import trl
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.trl import SFTTrainer
from peftkit.serialization import adapter_state_dict
from peftkit.testing.models import tiny_llama
from peftkit.testing.tokenizers import word_level_tokenizer
from safetensors.torch import load_file

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
WHOLE_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
SUBJECTS = ["the cat", "a dog", "my bird", "the fox"]
VERBS = ["sees", "likes", "chases", "finds"]
OBJECTS = ["the ball", "a tree"]
TEXTS = [f"{s} {v} {o} ." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]  # 32 texts


def word_tokenizer():
    return word_level_tokenizer(TEXTS)


def text_dataset():
    return datasets.Dataset.from_dict({"text": TEXTS})


def lora_config(**overrides) -> LoraConfig:
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    settings.update(overrides)
    return LoraConfig(**settings)


def sft_config(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=0.02,
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        activation_checkpointing=False,  # transformers 5's name for gradient_checkpointing
        bf16=False,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def peft_llama() -> PeftModel:
    return get_peft_model(tiny_llama(), lora_config())


def sft_trainer(model, output_dir, **config) -> SFTTrainer:
    return SFTTrainer(
        model=model,
        args=sft_config(output_dir, **config),
        train_dataset=text_dataset(),
        processing_class=word_tokenizer(),
    )


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {
        key: value.detach().float().clone() for key, value in adapter_state_dict(model, "default").items()
    }


def assert_same_tensors(actual, expected, atol=0.0):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_checkpoints_hold_only_the_adapter(tmp_path):
    # bf16=False: TRL's fused LM head must run on the base model, not on the peftkit wrapper
    model = peft_llama()
    trainer = sft_trainer(model, tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        names = {path.name for path in folder.iterdir()}
        assert ADAPTER_FILES <= names, folder
        assert not names & WHOLE_MODEL_FILES, folder
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert saved and all(".lora_" in key for key in saved)
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_same_tensors({key: value.float() for key, value in saved.items()}, adapter_tensors(model))
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in saved.items())


def test_resuming_from_a_checkpoint_ends_with_the_uninterrupted_adapter(tmp_path):
    full = peft_llama()
    sft_trainer(full, tmp_path / "full").train()
    expected = adapter_tensors(full)

    resumed = peft_llama()
    before = adapter_tensors(resumed)
    trainer = sft_trainer(resumed, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    actual = adapter_tensors(resumed)
    assert_same_tensors(actual, expected, atol=1e-6)
    assert any((actual[key] - before[key]).abs().max() > 1e-3 for key in before)
    assert trainer.state.global_step == 4


def test_the_loss_falls_with_trls_defaults(tmp_path):
    # TRL's defaults: bf16 autocast (on the CPU too) and gradient checkpointing
    trainer = SFTTrainer(
        model=get_peft_model(tiny_llama(), lora_config(target_modules="all-linear")),
        args=sft_config(tmp_path, bf16=True, activation_checkpointing=True, max_steps=24, save_strategy="no"),
        train_dataset=text_dataset(),
        eval_dataset=text_dataset(),
        processing_class=word_tokenizer(),
    )
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.args.gradient_checkpointing
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    # measured: 4.81 -> 4.40 (a random tiny Llama starts near log(128) = 4.85)
    assert after < before - 0.25, (before, after)


def test_the_fused_loss_equals_the_models_own_loss(tmp_path):
    # TRL scores labels through lm_head.weight on the backbone's hidden states; with the adapters in play
    # that must equal the loss the peftkit model computes from its own logits
    model = peft_llama()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    trainer = sft_trainer(model, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch.pop("use_cache", None)
    model.eval()
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch))
        own = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]
        )
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(fused, own.loss, atol=1e-5, rtol=1e-5)
    assert (fused - base).abs() > 1e-3  # the adapters count in the fused loss


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = peft_llama()
    plain_trainer = sft_trainer(plain, tmp_path / "plain", save_strategy="no")
    plain_trainer.train()

    checkpointed = peft_llama()
    trainer = sft_trainer(
        checkpointed,
        tmp_path / "checkpointed",
        save_strategy="no",
        activation_checkpointing=True,
        # reentrant checkpointing gives the adapters no gradients unless the embeddings' output requires grad
        activation_checkpointing_kwargs={"use_reentrant": True},
    )
    trainer.train()

    assert checkpointed.get_base_model().model.gradient_checkpointing
    assert logged_losses(trainer) == pytest.approx(logged_losses(plain_trainer), abs=1e-5)
    assert_same_tensors(adapter_tensors(checkpointed), adapter_tensors(plain), atol=1e-5)


def test_peft_config_applies_a_peftkit_adapter_seeded_like_the_run(tmp_path):
    made = []
    for draw in range(2):
        base = tiny_llama()  # seeds torch itself
        torch.manual_seed(100 + draw)  # the adapter's init must follow the run's seed, not the global state
        trainer = SFTTrainer(
            model=base,
            args=sft_config(tmp_path / str(draw), save_strategy="no"),
            train_dataset=text_dataset(),
            processing_class=word_tokenizer(),
            peft_config=lora_config(),
        )
        assert isinstance(trainer.model, PeftModel)
        made.append(adapter_tensors(trainer.model))
    assert made[0] and any("lora_A" in key for key in made[0])
    assert_same_tensors(made[1], made[0])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert ADAPTER_FILES <= {path.name for path in (tmp_path / "final").iterdir()}


def test_a_peft_library_config_names_peftkits_config(tmp_path):
    with pytest.raises(
        TypeError, match=r"got LoraConfig from the peft library.*from peftkit import LoraConfig"
    ):
        SFTTrainer(
            model=tiny_llama(),
            args=sft_config(tmp_path),
            train_dataset=text_dataset(),
            processing_class=word_tokenizer(),
            peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_trls_own_trainer_refuses_a_peftkit_config(tmp_path):
    with pytest.raises(TypeError, match=r"must be a `peft.PeftConfig` instance"):
        trl.SFTTrainer(
            model=tiny_llama(),
            args=sft_config(tmp_path),
            train_dataset=text_dataset(),
            processing_class=word_tokenizer(),
            peft_config=lora_config(),
        )


def test_a_model_with_adapters_and_a_peft_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="already has adapters together with peft_config"):
        SFTTrainer(
            model=peft_llama(),
            args=sft_config(tmp_path),
            train_dataset=text_dataset(),
            processing_class=word_tokenizer(),
            peft_config=lora_config(),
        )


def test_an_adapter_on_the_lm_head_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="adapter on its LM head.*Leave the LM head out of target_modules"):
        sft_trainer(model, tmp_path)


def test_the_model_card_names_peftkit_the_method_and_the_base_model(tmp_path):
    trainer = sft_trainer(peft_llama(), tmp_path, save_strategy="no")
    trainer.create_model_card(model_name="tiny-sft")
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: peft" in header
    assert "- peftkit" in header and "- lora" in header and "- sft" in header
    assert "[None](" not in card
    assert "This is a peftkit adapter (lora) for `LlamaForCausalLM`" in card
    assert 'PeftModel.from_pretrained(base, "tiny-sft")' in card
    assert 'model="None"' not in card
    assert "- peftkit: " in card and "- peftkit-lora: " in card


def test_qlora_trains_on_a_4bit_base_loaded_by_the_trainer(tmp_path):
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "tiny-llama"
    tiny_llama(hidden_size=64).save_pretrained(folder)  # bitsandbytes quantizes in blocks of 64 weights
    trainer = SFTTrainer(
        model=str(folder),
        args=sft_config(tmp_path / "run", max_steps=2, save_steps=2),
        train_dataset=text_dataset(),
        processing_class=word_tokenizer(),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        peft_config=lora_config(),
    )
    model = trainer.model
    import bitsandbytes as bnb

    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    trainer.train()

    moved = [param for name, param in model.named_parameters() if "lora_B" in name]
    assert moved and all(param.abs().max() > 0 for param in moved)
    names = {path.name for path in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert ADAPTER_FILES <= names and not names & WHOLE_MODEL_FILES
