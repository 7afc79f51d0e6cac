"""transformers' Trainer, plain or peftkit's, trains a peftkit adapter on a quantized base (QLoRA)."""

from __future__ import annotations

import pytest
import torch
from peftkit import LoraConfig, get_peft_model, prepare_model_for_kbit_training

pytest.importorskip("accelerate", reason="transformers' Trainer needs the accelerate package")
import transformers  # noqa: E402
from peftkit.integrations.transformers import PeftkitTrainer  # noqa: E402


def training_args(output_dir) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        learning_rate=0.05,
        max_steps=2,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def causal_lm_data(count: int = 4) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 128, (count, 8), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


@pytest.mark.parametrize(
    "trainer_class", [transformers.Trainer, PeftkitTrainer], ids=lambda cls: cls.__name__
)
def test_trainers_train_an_adapter_on_a_quantized_base(load_quantized, tmp_path, trainer_class):
    # transformers refuses a quantized model without adapters; it must see that a peftkit model has them
    base = prepare_model_for_kbit_training(load_quantized("nf4"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer_class(model=model, args=training_args(tmp_path), train_dataset=causal_lm_data()).train()
    moved = [param for name, param in model.named_parameters() if "lora_B" in name]
    assert moved and all(param.abs().max() > 0 for param in moved)


def test_a_quantized_model_without_adapters_is_still_refused(load_quantized, tmp_path):
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=load_quantized("nf4"), args=training_args(tmp_path))
