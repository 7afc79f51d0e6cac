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
    that peftkit does not load (a prediction head), for ``peftkit inspect`` to say. ``name``: the adapter's
    name as the folder gives it, which ``load_adapter`` uses when given none.
    """

    format: str
    method: str
    file: Path
    source_config: dict[str, Any]
    source_tensors: dict[str, Any]
    config: PeftConfig | None = None
    tensors: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    name: str | None = None


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
    adapter = plugins.read_foreign_adapter(folder, model)
    if adapter is None and adapterhub_config(folder) is not None:
        from peftkit.errors import AdapterLoadError

        architecture = _adapterhub_architecture(adapterhub_config(folder)["config"])
        raise AdapterLoadError(
            f"{str(folder)!r} holds an AdapterHub adapter ({architecture}), and no installed plugin reads "
            "AdapterHub's adapters of that kind (peftkit-bottleneck reads its bottleneck adapters and "
            "AdapterFusion, peftkit-lora its LoRA); load this one with AdapterHub's adapters library"
        )
    return adapter


def _adapterhub_architecture(config: dict[str, Any]) -> str:
    architecture = config.get("architecture") or "bottleneck"
    if architecture == "union":
        parts = [
            _adapterhub_architecture(part) for part in config.get("configs", []) if isinstance(part, dict)
        ]
        return f"a union of {' + '.join(parts)}"
    return f"architecture {architecture!r}"


# --- AdapterHub's folders: the layout every AdapterHub method shares ----------------------------------------
# What ``adapters``' ``save_adapter`` writes, whatever the method: ``adapter_config.json`` (``{"config":
# {...the method's config...}, "name", "model_type", "hidden_size", "model_class", "model_name", "version"}``)
# and the tensors in ``pytorch_adapter.bin`` (a pickle) or ``adapter.safetensors``; a prediction head saved
# beside the adapter is in ``head_config.json`` and ``pytorch_model_head.bin`` (or ``model_head.safetensors``).
# Each plugin that reads one of AdapterHub's methods reads the folder with these and the config's
# ``architecture`` with its own code.
ADAPTERHUB_FORMAT = "adapterhub"
ADAPTERHUB_WEIGHTS_NAME = "pytorch_adapter.bin"
ADAPTERHUB_SAFE_WEIGHTS_NAME = "adapter.safetensors"
ADAPTERHUB_HEAD_FILES = ("head_config.json", "pytorch_model_head.bin", "model_head.safetensors")


def adapterhub_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``adapter_config.json`` if it is AdapterHub's (a ``"config"`` object beside the adapter's
    ``"name"``); None otherwise."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "name" in data:
        return data
    return None


def adapterhub_head_notes(folder: Path) -> list[str]:
    """``ForeignAdapter.notes`` for the prediction-head files saved beside an AdapterHub adapter."""
    return [
        f"{name}: a prediction head, which peftkit does not load"
        for name in ADAPTERHUB_HEAD_FILES
        if (folder / name).is_file()
    ]


def read_adapterhub_tensors(
    folder: Path,
    safe_name: str = ADAPTERHUB_SAFE_WEIGHTS_NAME,
    legacy_name: str = ADAPTERHUB_WEIGHTS_NAME,
) -> tuple[Path, dict[str, Any]]:
    """The file read and its tensors: ``adapter.safetensors``, else ``pytorch_adapter.bin`` read without
    executing code (``weights_only=True``); :class:`peftkit.AdapterLoadError` naming the file otherwise.
    Other files of AdapterHub's layout (an AdapterFusion's) are named by ``safe_name`` and ``legacy_name``."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from peftkit.errors import AdapterLoadError

    safe = folder / safe_name
    if safe.is_file():
        try:
            return safe, load_file(str(safe))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(f"{str(safe)!r} is not a readable safetensors file ({exc})") from exc
    legacy = folder / legacy_name
    if not legacy.is_file():
        raise AdapterLoadError(
            f"{str(folder)!r} has AdapterHub's config but neither {legacy_name} nor {safe_name}"
        )
    try:
        return legacy, torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(
            f"{str(legacy)!r} is not a weights-only torch file, so peftkit does not read it (a pickle that holds "
            f"more than tensors could run code when loaded): {exc}"
        ) from exc


def adapterhub_folder_data(
    model: nn.Module, config: dict[str, Any], name: str, version: str, **extra: Any
) -> dict[str, Any]:
    """The ``adapter_config.json`` AdapterHub writes beside an adapter (or, with ``adapter_names`` in
    ``extra``, a fusion): the method's ``config`` and what it says of the model. ``version``: the writer's
    (``"peftkit-lora.0.7.0"``)."""
    model_config = model.config
    return {
        **extra,
        "config": config,
        "hidden_size": model_config.hidden_size,
        "model_class": type(model).__name__,
        "model_name": getattr(model_config, "_name_or_path", "") or "",
        "model_type": model_config.model_type,
        "name": name,
        "version": version,
    }


def write_adapterhub_files(
    folder: Path,
    data: dict[str, Any],
    tensors: dict[str, Any],
    config_name: str = CONFIG_NAME,
    weights_name: str = ADAPTERHUB_WEIGHTS_NAME,
    safe_name: str = ADAPTERHUB_SAFE_WEIGHTS_NAME,
) -> None:
    """Write an AdapterHub folder as ``save_adapter`` does: ``adapter_config.json`` (``data``),
    ``pytorch_adapter.bin`` (what ``load_adapter`` reads by default) and ``adapter.safetensors`` (what it
    reads with ``use_safetensors=True``); other names for other files of the layout (an AdapterFusion's)."""
    import torch
    from safetensors.torch import save_file

    ready = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in tensors.items()}
    (folder / config_name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    torch.save(ready, folder / weights_name)
    save_file(ready, str(folder / safe_name), metadata={"format": "pt"})
