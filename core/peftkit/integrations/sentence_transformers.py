"""sentence-transformers with peftkit adapters: adding them, training with adapter-only checkpoints, resuming.

A ``SentenceTransformer`` (or ``CrossEncoder``, ``SparseEncoder``) is a sequence of modules; its
``Transformer`` module holds the transformers model as ``.model`` (``auto_model``). sentence-transformers'
own ``add_adapter`` and ``load_adapter`` inject PEFT into that model in place, which needs PEFT's classes.
:func:`add_peftkit_adapter` and :func:`load_peftkit_adapter` instead put a peftkit ``PeftModel`` around it,
in the same slot, so encoding, the losses and the trainer run through the adapter unchanged.

Saving needs nothing more: sentence-transformers saves the ``Transformer`` module by calling its model's
``save_pretrained``, which for a peftkit model writes only ``adapter_config.json`` and
``adapter_model.safetensors`` in PEFT's format, beside the usual ``modules.json``, pooling config and
tokenizer. That folder loads back in sentence-transformers (``SentenceTransformer(folder)`` or
``load_adapter``, with PEFT installed), and here with :func:`load_peftkit_adapter`.

Reading a checkpoint back is where the trainer needs help: ``SentenceTransformerTrainer`` resumes (and
loads the best model) by building a whole new model from the checkpoint and copying its state dict over,
which for an adapter checkpoint means PEFT's model layout, not peftkit's. :class:`PeftkitSentenceTransformerTrainer`
(or :class:`PeftkitSentenceTransformerTrainerMixin` before any sentence-transformers trainer class) copies
the checkpoint's adapter tensors into the model's adapters in place instead, and the weights of any other
module that trains (a ``Dense`` layer, say) from that module's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentence_transformers.base.model import BaseModel
from sentence_transformers.base.modules import Transformer
from sentence_transformers.sentence_transformer import SentenceTransformerTrainer
from torch import nn

from peftkit.config import PeftConfig
from peftkit.errors import AdapterLoadError, ConfigError
from peftkit.integrations.transformers import load_adapter_weights
from peftkit.model import PeftModel, get_peft_model

__all__ = [
    "PeftkitSentenceTransformerTrainer",
    "PeftkitSentenceTransformerTrainerMixin",
    "add_peftkit_adapter",
    "find_peft_model",
    "load_checkpoint_weights",
    "load_peftkit_adapter",
]

MODULES_FILE = "modules.json"


def _transformer_module(model: Any) -> tuple[str, Transformer]:
    """The name and the module of the first ``Transformer`` module of a sentence-transformers model."""
    if not isinstance(model, BaseModel):
        raise TypeError(
            "expected a sentence-transformers model (SentenceTransformer, CrossEncoder or SparseEncoder), "
            f"got {type(model).__name__}"
        )
    for name, module in model.named_children():
        if isinstance(module, Transformer):
            return name, module
    kinds = ", ".join(type(module).__name__ for module in model.children()) or "no modules"
    raise TypeError(
        "peftkit adapters go on the transformers model inside a sentence-transformers Transformer module; "
        f"this model has none (it has {kinds})"
    )


def find_peft_model(model: nn.Module) -> PeftModel | None:
    """The peftkit model inside a sentence-transformers model (or the model itself if it is one), or None."""
    if isinstance(model, PeftModel):
        return model
    for module in model.modules():
        if isinstance(module, PeftModel):
            return module
    return None


def _check_no_peft_adapters(inner: nn.Module) -> None:
    # transformers' own PEFT integration (what sentence-transformers' add_adapter/load_adapter use) marks
    # the model it injected into; a peftkit adapter around it would stack on top of PEFT's layers
    if getattr(inner, "_hf_peft_config_loaded", False):
        raise ConfigError(
            "this model's transformer already carries PEFT adapters (added with sentence-transformers' "
            "add_adapter or load_adapter); start from a model without them, and load a saved PEFT adapter "
            "with load_peftkit_adapter instead"
        )


def add_peftkit_adapter(
    model: BaseModel, peft_config: PeftConfig, adapter_name: str = "default"
) -> PeftModel:
    """Put a new, trainable peftkit adapter on a sentence-transformers model's transformer, and activate it.

    The first adapter wraps the ``Transformer`` module's model in a peftkit ``PeftModel`` in place; later
    ones are added to that ``PeftModel``. As with sentence-transformers' ``add_adapter``, the new adapter
    becomes the active one. Returns the ``PeftModel`` (also ``model.transformers_model``).
    """
    _, module = _transformer_module(model)
    inner = module.model
    if isinstance(inner, PeftModel):
        inner.add_adapter(adapter_name, peft_config)
        inner.set_adapter(adapter_name)
        return inner
    _check_no_peft_adapters(inner)
    peft_model = get_peft_model(inner, peft_config, adapter_name)
    module.model = peft_model
    return peft_model


def load_peftkit_adapter(
    model: BaseModel,
    adapter_folder: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved adapter (peftkit's or PEFT's, such as sentence-transformers' ``save_pretrained`` writes
    for a model with a PEFT adapter) onto a sentence-transformers model's transformer, and activate it.

    ``adapter_folder`` holds ``adapter_config.json`` and ``adapter_model.safetensors``; a saved
    sentence-transformers model has them at its top level. Unless ``is_trainable``, the adapter is frozen.
    Returns the ``PeftModel`` (also ``model.transformers_model``).
    """
    _, module = _transformer_module(model)
    inner = module.model
    if isinstance(inner, PeftModel):
        inner.load_adapter(adapter_folder, adapter_name, is_trainable=is_trainable)
        inner.set_adapter(adapter_name)
        return inner
    _check_no_peft_adapters(inner)
    peft_model = PeftModel.from_pretrained(inner, adapter_folder, adapter_name, is_trainable=is_trainable)
    module.model = peft_model
    return peft_model


def _module_folders(checkpoint: Path) -> dict[str, Path]:
    """Each module's folder in a saved sentence-transformers model, by module name (from modules.json)."""
    modules_file = checkpoint / MODULES_FILE
    if not modules_file.is_file():
        raise AdapterLoadError(
            f"checkpoint {str(checkpoint)!r} has no {MODULES_FILE}: it is not a saved sentence-transformers "
            "model, so its adapter cannot be located"
        )
    entries = json.loads(modules_file.read_text(encoding="utf-8"))
    return {entry["name"]: checkpoint / entry["path"] for entry in entries}


def load_checkpoint_weights(model: BaseModel, checkpoint: str | Path) -> list[str]:
    """Copy a saved sentence-transformers model's adapter tensors, and the weights of its other modules that
    train, into ``model`` in place. Returns the adapter names loaded."""
    checkpoint = Path(checkpoint)
    folders = _module_folders(checkpoint)
    transformer_name, module = _transformer_module(model)
    peft_model = module.model
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"module {transformer_name!r} holds no peftkit model (add one with add_peftkit_adapter)"
        )
    if transformer_name not in folders:
        raise AdapterLoadError(
            f"checkpoint {str(checkpoint)!r} lists no module {transformer_name!r} in {MODULES_FILE} "
            f"(it lists {sorted(folders)})"
        )
    loaded = load_adapter_weights(peft_model, folders[transformer_name])
    for name, other in model.named_children():
        if name == transformer_name or not any(p.requires_grad for p in other.parameters()):
            continue
        if name not in folders or not hasattr(other, "load_torch_weights"):
            raise AdapterLoadError(
                f"module {name!r} ({type(other).__name__}) trains, but checkpoint {str(checkpoint)!r} "
                "has no weights for it that sentence-transformers can load"
            )
        folder = folders[name]
        other.load_torch_weights(str(folder.parent), subfolder=folder.name, model=other)
    return loaded


class PeftkitSentenceTransformerTrainerMixin:
    """Resuming and best-model loading from adapter-only checkpoints, for a sentence-transformers trainer
    whose model carries a peftkit adapter; put it before the trainer class in the bases."""

    def _peftkit_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return find_peft_model(model)

    def _load_from_checkpoint(self, checkpoint_path: str, *args: Any, **kwargs: Any) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self._peftkit_model() is None:
            return super()._load_from_checkpoint(checkpoint_path, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        load_checkpoint_weights(model, checkpoint_path)
        return None


class PeftkitSentenceTransformerTrainer(PeftkitSentenceTransformerTrainerMixin, SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` that resumes and picks the best model from adapter-only checkpoints."""
