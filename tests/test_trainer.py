"""transformers' Trainer with peftkit models, through peftkit.integrations.transformers.PeftkitTrainer.

Checkpoints hold the adapter only, resuming continues from the checkpoint's adapter, and
``load_best_model_at_end`` puts the best checkpoint's adapter back into the model.
"""

from __future__ import annotations

import json

import pytest
import torch
from peftkit import get_peft_model
from peftkit.errors import AdapterLoadError
from peftkit.testing.models import tiny_bert, tiny_llama
from safetensors.torch import load_file

# transformers' Trainer needs accelerate, which transformers does not install by itself
pytest.importorskip("accelerate", reason="transformers' Trainer needs the accelerate package")
import transformers  # noqa: E402
from peftkit.integrations.transformers import PeftkitTrainer, load_adapter_weights  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def lora_config(**overrides):
    from peftkit import LoraConfig

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    settings.update(overrides)
    return LoraConfig(**settings)


def causal_lm_data(count: int, seed: int = 1, length: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        learning_rate=0.05,
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    from peftkit.serialization import adapter_state_dict

    return {key: value.clone() for key, value in adapter_state_dict(model, "default").items()}


def assert_same_tensors(actual, expected, atol=0.0):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def test_checkpoints_hold_only_the_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config())
    trainer = PeftkitTrainer(model=model, args=training_args(tmp_path), train_dataset=causal_lm_data(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        names = {path.name for path in folder.iterdir()}
        assert ADAPTER_FILES <= names, folder
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, folder
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert saved and all(".lora_" in key for key in saved)
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the final save is the trained adapter, and it moved away from its init (B starts at zero)
    assert_same_tensors(saved, adapter_tensors(model))
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in saved.items())


def test_resuming_from_a_checkpoint_ends_with_the_uninterrupted_adapter(tmp_path):
    data = causal_lm_data(8)
    full = get_peft_model(tiny_llama(), lora_config())
    PeftkitTrainer(model=full, args=training_args(tmp_path / "full"), train_dataset=data).train()
    expected = adapter_tensors(full)

    resumed = get_peft_model(tiny_llama(), lora_config())
    before = adapter_tensors(resumed)  # a fresh adapter: resuming must replace it by the checkpoint's
    trainer = PeftkitTrainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    actual = adapter_tensors(resumed)

    assert_same_tensors(actual, expected, atol=1e-6)
    assert any((actual[key] - before[key]).abs().max() > 1e-3 for key in before)
    assert trainer.state.global_step == 4


def test_resuming_without_the_adapter_in_the_checkpoint_says_so(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config())
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(AdapterLoadError, match="holds no weights for the active adapter 'default'"):
        load_adapter_weights(model, tmp_path / "checkpoint-2")


def classification_data(count: int, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (count, 8), generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    config = lora_config(target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(), config)
    args = training_args(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        learning_rate=0.5,  # large, so the adapters of the three checkpoints differ clearly
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    data = classification_data(8)
    trainer = PeftkitTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()

    best = trainer.state.best_model_checkpoint
    assert best is not None
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 3
    saved = {path.name: load_file(str(path / "adapter_model.safetensors")) for path in checkpoints}
    current = adapter_tensors(model)
    # the model now holds exactly the best checkpoint's adapter (the score head is saved with it) ...
    assert_same_tensors(current, saved[best.rsplit("/", 1)[-1]])
    # ... and the checkpoints differ from each other, so this would fail if another one were loaded
    others = [name for name in saved if name != best.rsplit("/", 1)[-1]]
    for name in others:
        assert any(not torch.equal(saved[name][key], current[key]) for key in current)
    # its evaluation loss is the best one logged
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert trainer.state.best_metric == min(losses)


def test_label_smoothing_shifts_the_labels_of_a_causal_lm(tmp_path):
    data = causal_lm_data(2)
    model = get_peft_model(tiny_llama(), lora_config())
    args = training_args(tmp_path, label_smoothing_factor=0.1)
    trainer = PeftkitTrainer(model=model, args=args, train_dataset=data)
    batch = trainer.data_collator(data)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"]).logits
    # position i predicts token i + 1, as the model's own causal-LM loss has it
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)
