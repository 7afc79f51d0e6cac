"""What a plain transformers ``Trainer`` saves of a peftkit model, said once, at its first save.

``Trainer._save`` writes adapter files only for the classes it knows (``PreTrainedModel`` and PEFT's own
``PeftModel``); any other model, a peftkit one included, goes to its fallback, which writes
``model.state_dict()`` as ``model.safetensors``: the whole model, base weights and all. That is a correct
checkpoint (``Trainer`` resumes from it) but not an adapter, so the first time a ``Trainer`` takes a
peftkit model's state dict to save it, a warning names ``PeftkitTrainer``, which saves adapters.

Seeing the save from the model's side needs no change to transformers: a state-dict hook on the model
looks whether its caller is ``Trainer._save``. This module imports nothing; ``PeftModel`` registers
:func:`warn_on_plain_trainer_save` as a state-dict pre-hook.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

TOLD = "_peftkit_told_whole_model_checkpoint"
# state_dict's caller and a few frames above it, in case the model's state_dict is reached through a
# wrapper module's
FRAMES_TO_LOOK_AT = 4


def _called_by_trainer_save() -> bool:
    try:
        frame = sys._getframe(3)  # 0: this function, 1: the hook, 2: Module.state_dict, 3: its caller
    except ValueError:  # a stack that shallow has no Trainer in it
        return False
    for _ in range(FRAMES_TO_LOOK_AT):
        if frame is None:
            return False
        if frame.f_code.co_name == "_save" and frame.f_globals.get("__name__") == "transformers.trainer":
            return True
        frame = frame.f_back
    return False


def warn_on_plain_trainer_save(model: Any, prefix: str, keep_vars: bool) -> None:
    """A state-dict pre-hook: warn once per model when ``transformers.Trainer._save`` asks for it."""
    if model.__dict__.get(TOLD) or not _called_by_trainer_save():
        return
    model.__dict__[TOLD] = True
    warnings.warn(
        "transformers.Trainer is saving this peftkit model whole (base weights included, as "
        "model.safetensors): Trainer writes adapter-only checkpoints only for PEFT's own PeftModel class. "
        "Use peftkit.integrations.transformers.PeftkitTrainer (or PeftkitTrainerMixin) for checkpoints that "
        "hold only the adapter (adapter_config.json + adapter_model.safetensors), or call "
        "model.save_pretrained(folder) after training.",
        UserWarning,
        stacklevel=3,
    )
