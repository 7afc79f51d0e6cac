"""A transformers ``TrainerCallback`` that runs AdaLoRA's rank allocation at each optimizer step."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class AdaLoraCallback(TrainerCallback):
    """Calls ``model.update_and_allocate(global_step)`` after each ``optimizer.step()``, before ``zero_grad``.

    ``Trainer`` fires ``on_optimizer_step`` at exactly that point, while ``state.global_step`` still counts
    the steps taken before this one: the first step is 0, as PEFT's ``update_and_allocate`` expects::

        trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[AdaLoraCallback()])
    """

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        while not hasattr(model, "update_and_allocate") and hasattr(model, "module"):
            model = model.module  # unwrap DistributedDataParallel and the like
        model.update_and_allocate(state.global_step)
