"""Adapters in other libraries' formats: what a plugin that reads one answers, and asking the plugins.

An adapter folder is PEFT's when its ``adapter_config.json`` names a ``peft_type``. Any other folder is
offered to the plugins through ``peftkit_read_foreign_adapter``; the first that recognises its format
answers a :class:`ForeignAdapter`: the folder as it is (for ``peftkit inspect``) and, given the base
model, the adapter as one of its method's, with tensors under PEFT's keys (for
``PeftModel.from_pretrained`` and ``load_adapter``). Writing the other way is
``peftkit_save_foreign_adapter``, which ``save_pretrained(folder, format=...)`` asks.

This module imports no torch, so ``peftkit inspect`` stays light until it reads a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.config import CONFIG_NAME

if TYPE_CHECKING:
    from torch import nn

    from peftkit.config import PeftConfig

PEFT_FORMAT = "peft"


@dataclass
class ForeignAdapter:
    """An adapter folder in another library's format, as the plugin that reads that format found it.

    ``format``: the format's name (``"adapterhub"``), also the ``format=`` that writes it, where a plugin
    writes it. ``method``: the peftkit method it loads as. ``file``: the tensor file read.
    ``source_config`` and ``source_tensors``: the folder's config and tensors under its own names.
    ``config`` and ``tensors``: the adapter as ``method``'s config, and its tensors under PEFT's keys
    for the base model it was read for; None when no model was given. ``notes``: what the folder holds
    that peftkit does not load (a prediction head), for ``peftkit inspect`` to say.
    """

    format: str
    method: str
    file: Path
    source_config: dict[str, Any]
    source_tensors: dict[str, Any]
    config: PeftConfig | None = None
    tensors: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def is_peft_folder(folder: Path) -> bool:
    """Whether ``folder`` holds PEFT's adapter config (or a config too broken to tell: PEFT's reader then
    gives its error)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return True
    return not isinstance(data, dict) or "peft_type" in data


def read_foreign_adapter(folder: str | Path, model: nn.Module | None = None) -> ForeignAdapter | None:
    """The folder as the plugin that knows its format reads it; None for PEFT's folders and unknown ones."""
    from peftkit import plugins

    folder = Path(folder)
    if not folder.is_dir() or is_peft_folder(folder):
        return None
    return plugins.read_foreign_adapter(folder, model)
