"""transformers' ``Trainer`` with peftkit models: adapter-only checkpoints, resuming from them, best model.

``Trainer`` recognises PEFT's own ``PeftModel`` class by ``isinstance``; a peftkit model is not one, so a
plain ``Trainer`` trains it but saves and reloads the whole model (``model.safetensors``, with a warning
at the first save: :mod:`peftkit.integrations.plain_trainer`). :class:`PeftkitTrainer`
changes the three places where a checkpoint's model weights are written or read:

- ``_save``: ``model.save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``, other
  adapters in sub-folders), plus the tokenizer and training arguments as ``Trainer`` saves them;
- ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end=True``): the checkpoint's adapter tensors are copied into the model's
  adapters in place, so the optimizer and any DDP wrapper keep pointing at the same parameters.

Like ``Trainer`` does for PEFT's models, it also reads from the base model's class what ``Trainer``
reads from the model's class: the label names (so evaluation reports a loss whatever the labels are
called) and whether label smoothing must shift the labels (causal LMs). The dataset columns to keep
``Trainer`` reads from ``inspect.signature(model.forward)``, which for a peftkit model is the base
model's (see :mod:`peftkit.forward_signature`). Anything else (a model that is not a peftkit
``PeftModel``, DeepSpeed, FSDP checkpoints) goes to ``Trainer``'s own code.

:class:`PeftkitTrainerMixin` puts the same behaviour into another ``Trainer`` subclass, such as TRL's
``SFTTrainer``: ``class MyTrainer(PeftkitTrainerMixin, SFTTrainer): ...``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from peftkit import serialization
from peftkit.errors import AdapterLoadError
from peftkit.model import PeftModel

__all__ = ["PeftkitTrainer", "PeftkitTrainerMixin", "load_adapter_weights"]

CAUSAL_LM_NAMES = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def adapter_folder(checkpoint: str | Path, adapter_name: str) -> Path:
    """Where ``save_pretrained`` puts an adapter: "default" at the top, any other in a sub-folder."""
    return Path(checkpoint) if adapter_name == "default" else Path(checkpoint, adapter_name)


def _has_weights(folder: Path) -> bool:
    return (folder / serialization.WEIGHTS_NAME).is_file() or (folder / serialization.LEGACY_WEIGHTS_NAME).is_file()


def load_adapter_weights(model: PeftModel, checkpoint: str | Path) -> list[str]:
    """Copy the tensors saved in ``checkpoint`` into the model's existing adapters of the same names.

    Every active adapter must be in the checkpoint; inactive ones are loaded where present. Returns the
    names loaded.
    """
    loaded = []
    for name in model.peft_config:
        folder = adapter_folder(checkpoint, name)
        if not _has_weights(folder):
            if name in model.active_adapters:
                raise AdapterLoadError(
                    f"checkpoint {str(checkpoint)!r} holds no weights for the active adapter {name!r} "
                    f"(looked for {str(folder / serialization.WEIGHTS_NAME)!r})"
                )
            continue
        serialization.load_adapter_state_dict(model, name, serialization.read_tensors(folder))
        loaded.append(name)
    return loaded


class PeftkitTrainerMixin:
    """Adapter-only checkpoints for peftkit models; put it before the ``Trainer`` class in the bases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._peftkit_model()
        if model is None:
            return
        # what Trainer reads from a PEFT model's base model, read here from a peftkit model's
        base_class = type(model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)
        if self.label_smoother is not None and model.get_base_model()._get_name() in CAUSAL_LM_NAMES:
            self.label_smoother = functools.partial(self.label_smoother, shift_labels=True)

    def _peftkit_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _handles_checkpoints(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and self._peftkit_model() is not None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._handles_checkpoints():
            return super()._save(output_dir, state_dict)
        model = self._peftkit_model()
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._handles_checkpoints():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(self._peftkit_model(), resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        if not self._handles_checkpoints():
            return super()._load_best_model()
        load_adapter_weights(self._peftkit_model(), self.state.best_model_checkpoint)
        return None


class PeftkitTrainer(PeftkitTrainerMixin, Trainer):
    """``transformers.Trainer`` that saves, resumes and picks the best model by adapter weights only."""
