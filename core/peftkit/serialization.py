"""Adapter tensors to and from PEFT's on-disk format, with atomic saves and clear load errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftkit import plugins
from peftkit.adapter_layer import AdapterLayer, adapter_layers
from peftkit.config import PeftConfig, read_config_dict
from peftkit.errors import AdapterLoadError
from peftkit.injection import logical_path
from peftkit.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from peftkit.model import PeftModel

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def layer_tensors(
    peft_model: PeftModel, adapter_name: str, key_root: str, for_saving: bool = False
) -> dict[str, torch.Tensor]:
    """The adapter's tensors in every adapter layer, keyed as PEFT keys them (no adapter name).

    ``for_saving``: as the file holds them (:meth:`AdapterLayer.saved_tensors`); otherwise the layers'
    parameters themselves, which loading copies into. Paths are those of the base model before any
    adapter wrapped it, so a key does not depend on which other adapters share the model.
    """
    entries = _layer_entries(peft_model, adapter_name, key_root, for_saving)
    return {key: tensor for key, (_, _, tensor) in entries.items()}


def _layer_entries(
    peft_model: PeftModel, adapter_name: str, key_root: str, for_saving: bool = False
) -> dict[str, tuple[AdapterLayer, str, torch.Tensor]]:
    """:func:`layer_tensors`, each tensor with its layer and its name there."""
    out = {}
    for path, layer in adapter_layers(peft_model.base_model.model):
        named = layer.saved_tensors(adapter_name) if for_saving else layer.adapter_parameters(adapter_name)
        for local, tensor in named:
            out[f"{key_root}{logical_path(path)}.{local}"] = (layer, local, tensor)
    return out


def adapter_state_dict(peft_model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    config = peft_model.peft_config[adapter_name]
    spec = plugins.method_for_config(config)
    state = layer_tensors(peft_model, adapter_name, spec.key_root, for_saving=True)
    state.update(plugins.extra_state_dict(peft_model, config, adapter_name))
    return {key: tensor.detach() for key, tensor in state.items()}


def load_adapter_state_dict(peft_model: PeftModel, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into a freshly injected adapter; any shape or key mismatch is an error."""
    config = peft_model.peft_config[adapter_name]
    spec = plugins.method_for_config(config)
    state = _without_peft_wrapper_names(peft_model, spec.key_root, state)
    expected = _layer_entries(peft_model, adapter_name, spec.key_root)
    ready = {}
    for key, (layer, local, target) in expected.items():
        if key not in state:
            raise AdapterLoadError(
                f"the adapter file has no tensor {key!r}, which the adapter's config implies for this base model"
            )
        ready[key] = layer.tensor_to_load(adapter_name, local, state[key])
        check_shape(key, ready[key], target)
    with torch.no_grad():
        for key, (_, _, target) in expected.items():
            target.copy_(ready[key])
    rest = {key: value for key, value in state.items() if key not in expected}
    # asked even when nothing is left, so a method can say that a tensor it needs is missing
    taken = plugins.load_extra_state_dict(peft_model, config, adapter_name, rest)
    taken |= _load_base_weights(peft_model, spec.key_root, {k: v for k, v in rest.items() if k not in taken})
    unknown = sorted(set(rest) - taken)
    if unknown:
        raise AdapterLoadError(
            f"the adapter file holds tensor {unknown[0]!r} ({len(unknown)} unplaced in all), which no module "
            f"of this {spec.name} adapter takes: the adapter does not fit this base model"
        )


def _without_peft_wrapper_names(
    peft_model: PeftModel, key_root: str, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PEFT's names inside its modules_to_save wrapper, as peftkit's: with ``bias="all"`` PEFT saves every
    bias of the model, the wrapper's own too. ``<head>.modules_to_save.<name>`` is the trained copy's
    tensor, which the file also holds as ``<head>.<name>``; ``<head>.original_module.<name>`` is the
    original module's, at ``<head>.base_layer.<name>`` here."""
    heads = [
        f"{key_root}{logical_path(path)}."
        for path, module in peft_model.base_model.model.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    ]
    out = {}
    for key, value in state.items():
        for head in heads:
            copy_key, original_key = head + "modules_to_save.", head + "original_module."
            if key.startswith(copy_key):
                key = head + key.removeprefix(copy_key)
                if key in state:
                    key = None  # the same tensor, saved under the head's own path as well
                break
            if key.startswith(original_key):
                key = head + "base_layer." + key.removeprefix(original_key)
                break
        if key is not None:
            out[key] = value
    return out


def _load_base_weights(peft_model: PeftModel, key_root: str, state: dict[str, torch.Tensor]) -> set[str]:
    """Base weights saved beside the adapter, as PEFT saves targeted embeddings (to carry a resized vocabulary)."""
    params = dict(peft_model.base_model.model.named_parameters())
    taken = set()
    for key, value in state.items():
        target = params.get(key.removeprefix(key_root)) if key.startswith(key_root) else None
        if target is None:
            continue
        check_shape(key, value, target)
        with torch.no_grad():
            target.copy_(value)
        taken.add(key)
    return taken


def saved_tensor(state_dict: dict[str, torch.Tensor], key: str, method: str) -> torch.Tensor:
    """The saved tensor ``key`` that every adapter of ``method`` holds; a clear error when it is missing."""
    if key not in state_dict:
        raise AdapterLoadError(f"the adapter file has no tensor {key!r}, which every {method} adapter holds")
    return state_dict[key]


def copy_checked(key: str, saved: torch.Tensor, target: torch.Tensor) -> None:
    """Copy a saved tensor into the model's, after checking the shapes agree."""
    check_shape(key, saved, target)
    with torch.no_grad():
        target.copy_(saved)


def check_shape(key: str, saved: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(saved.shape) != tuple(target.shape):
        raise AdapterLoadError(
            f"tensor {key!r} has shape {tuple(saved.shape)} in the adapter file but {tuple(target.shape)} "
            "in the model: the adapter was made for a base model of another size"
        )


def load_config(folder: str | Path) -> PeftConfig:
    """Read an adapter folder's config into the config class of the installed plugin for its peft_type."""
    data = read_config_dict(folder)
    spec = plugins.method_for_peft_type(data["peft_type"])
    return spec.config_class.from_dict(data)


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder: safetensors, or a legacy .bin read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(
                f"{str(path)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
            ) from exc
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(
                f"{str(legacy)!r} could not be read as a weights-only torch file: {exc}"
            ) from exc
    raise AdapterLoadError(f"{str(directory)!r} has no {WEIGHTS_NAME} (nor a legacy {LEGACY_WEIGHTS_NAME})")


def read_metadata(directory: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as handle:
        return dict(handle.metadata() or {})


def write_tensors(directory: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; PEFT's files hold one contiguous copy per tensor.
    ready = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in tensors.items()}
    save_file(ready, str(Path(directory) / WEIGHTS_NAME), metadata={"format": "pt", **metadata})


@contextlib.contextmanager
def atomic_folder(target: str | Path, keep_old_entries: bool = True) -> Iterator[Path]:
    """Build a folder's new content in a temporary folder beside it, then swap it into place.

    If anything fails before the swap, the target is untouched. With ``keep_old_entries``, entries of the
    old folder that the new content does not replace (other adapters' sub-folders, a README) are carried
    over; without, the new content replaces the old folder whole.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the saved folder gets the usual mode
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(staging, target)
        return
    if not target.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise NotADirectoryError(f"cannot save an adapter to {str(target)!r}: it is a file, not a folder")
    for entry in target.iterdir() if keep_old_entries else ():
        if not (staging / entry.name).exists():
            # keep what the old folder had beside the adapter (hard links: no copying, old folder intact)
            _link_or_copy(entry, staging / entry.name)
    backup = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_or_copy(source: Path, destination: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=_link_file)
    else:
        _link_file(source, destination)


def _link_file(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
