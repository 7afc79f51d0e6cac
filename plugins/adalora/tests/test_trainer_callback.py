"""AdaLoraCallback runs the rank allocation inside a transformers Trainer, at each optimizer step."""

from __future__ import annotations

import peftkit
import torch
from peftkit.testing.models import tiny_llama
from peftkit_adalora import AdaLoraCallback, AdaLoraConfig
from transformers import Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 8, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 128, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def test_the_callback_allocates_ranks_at_each_optimizer_step(tmp_path):
    config = AdaLoraConfig(
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        init_r=4,
        target_r=1,
        total_step=6,
        tinit=1,
        tfinal=2,
        deltaT=1,
    )
    model = peftkit.get_peft_model(tiny_llama(), config)
    seen = []  # (global step, whether the adapter tensors still had their gradients)
    allocate = model.update_and_allocate

    def spy(step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        seen.append((step, all(g is not None for g in grads)))
        allocate(step)

    model.update_and_allocate = spy
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[AdaLoraCallback()]).train()

    assert seen == [
        (step, True) for step in range(6)
    ]  # once per optimizer step, counted from 0, grads intact
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(mask) for mask in pattern.values()) == 1 * 4  # target_r × modules
