"""AdapterHub's adapter folders, read and written: what ``adapters``' ``save_adapter`` writes and
``load_adapter`` reads, for one bottleneck adapter; and its AdapterFusion folders (``save_adapter_fusion``,
``load_adapter_fusion``).

A folder holds ``adapter_config.json`` (``{"config": {...BnConfig...}, "name", "model_type", "hidden_size",
"model_class", "model_name", "version"}``) and the tensors in ``pytorch_adapter.bin`` (a pickle, read here
only with ``torch.load(..., weights_only=True)``) or ``adapter.safetensors``; ``head_config.json`` and
``pytorch_model_head.bin`` hold a prediction head, which is not read. Each layer's adapter is keyed
``<layer>.<location>.adapters.<name>.adapter_down.0.weight`` (``.bias``, and ``adapter_up.weight`` /
``.bias``), where ``<layer>`` is the transformer layer's path (``bert.encoder.layer.3``) and ``<location>``
is where AdapterHub keeps the adapters after the attention or the feed-forward block (:data:`LOCATIONS`).
Tensors are matched to peftkit's blocks by layer index and location, so the model class that saved them
(``BertModel`` or ``BertForSequenceClassification``) does not matter.

A fusion folder holds ``adapter_fusion_config.json`` (``{"config": {...fusion options...}, "adapter_names",
"name", ...}``) and ``pytorch_model_adapter_fusion.bin`` (or ``model_adapter_fusion.safetensors``), keyed
``<layer>.<location>.adapter_fusion_layer.<fusion name>.<query|key|value>.<weight|bias>``. It loads onto a
model that already holds the fused adapters, as in AdapterHub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from peftkit import foreign_format
from peftkit.errors import AdapterLoadError, ConfigError
from peftkit.foreign_format import ForeignAdapter
from peftkit.injection import logical_path
from torch import nn

from peftkit_bottleneck import adapterhub_config
from peftkit_bottleneck.config import BottleneckConfig
from peftkit_bottleneck.placement import located_insertion_points

FORMAT = foreign_format.ADAPTERHUB_FORMAT
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
FUSION_SAFE_WEIGHTS_NAME = "model_adapter_fusion.safetensors"

_BERT = {"attention_modules": "attention.output", "feedforward_modules": "output"}
_DECODER = {"attention_modules": "attention_adapters", "feedforward_modules": "output_adapters"}
# where AdapterHub keeps a layer's adapters, by model_type, for each kind of block peftkit adapts
LOCATIONS: dict[str, dict[str, str]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": _DECODER,
    "llama": _DECODER,
    "mistral": _DECODER,
}
# AdapterHub's parallel adapter reads the feed-forward block's residual input: on pre-norm decoders the
# residual stream before the feed-forward norm (parallel_input="residual"). On post-norm models (BERT) that is
# also the block's input, so either parallel_input is AdapterHub's there.
POST_NORM_MODEL_TYPES = ("bert", "roberta")
# peftkit's tensor names and AdapterHub's (its down projection is the first module of a Sequential)
TENSOR_NAMES = {
    "adapter_down.weight": "adapter_down.0.weight",
    "adapter_down.bias": "adapter_down.0.bias",
    "adapter_up.weight": "adapter_up.weight",
    "adapter_up.bias": "adapter_up.bias",
}
_SOURCE_KEY = re.compile(
    r"^(?P<layer>.*?\.(?P<index>\d+))\.(?P<location>.+)\.adapters\.(?P<name>[^.]+)\.(?P<tensor>.+)$"
)
_FUSION_KEY = re.compile(
    r"^(?P<layer>.*?\.(?P<index>\d+))\.(?P<location>.+)\.adapter_fusion_layer\.(?P<name>[^.]+)\.(?P<tensor>.+)$"
)
_LAYER = re.compile(r"^(?P<layer>.*?\.(?P<index>\d+))(?:\.|$)")


# --- recognising and reading ----------------------------------------------------------------------------
def read(folder: Path, model: nn.Module | None) -> ForeignAdapter | None:
    """An AdapterHub bottleneck adapter folder; None for a folder that is none (another method's too)."""
    if (folder / FUSION_CONFIG_NAME).is_file():
        return read_fusion(folder, model)
    data = foreign_format.adapterhub_config(folder)
    if data is None or not adapterhub_config.is_bottleneck(data["config"]):
        return None
    file, tensors = foreign_format.read_adapterhub_tensors(folder)
    adapter = ForeignAdapter(
        format=FORMAT,
        method="bottleneck",
        file=file,
        source_config=data,
        source_tensors=tensors,
        notes=foreign_format.adapterhub_head_notes(folder),
        name=data["name"],
    )
    if model is not None:
        adapter.config = adapterhub_config.from_adapterhub(
            data["config"], repr(str(folder / foreign_format.CONFIG_NAME))
        )
        adapter.tensors = peft_tensors(model, adapter.config, tensors, repr(str(file)))
    return adapter


def peft_tensors(
    model: nn.Module, config: BottleneckConfig, source: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """AdapterHub's tensors under the PEFT keys of the blocks ``config`` adapts in ``model``."""
    by_place: dict[tuple[int, str, str], tuple[str, torch.Tensor]] = {}
    for key, tensor in source.items():
        match = _SOURCE_KEY.match(key)
        if match is None or match["tensor"] not in TENSOR_NAMES.values():
            raise AdapterLoadError(
                f"{where} holds tensor {key!r}, which is not one of a bottleneck adapter's "
                f"({', '.join(TENSOR_NAMES.values())}) at a layer's adapter location"
            )
        by_place[int(match["index"]), match["location"], match["tensor"]] = (key, tensor)
    out = {}
    for layer_index, location, peft_path in _blocks(model, config):
        for ours, theirs in TENSOR_NAMES.items():
            found = by_place.pop((layer_index, location, theirs), None)
            if found is None:
                raise AdapterLoadError(
                    f"{where} has no {theirs!r} for layer {layer_index}'s {location!r} adapter, which the "
                    f"adapter's config implies for this {type(model).__name__}"
                )
            out[f"base_model.model.{peft_path}.{ours}"] = found[1]
    if by_place:
        key = sorted(key for key, _ in by_place.values())[0]
        raise AdapterLoadError(
            f"{where} holds tensor {key!r} ({len(by_place)} unplaced in all), which no block of this "
            f"{type(model).__name__} takes: the adapter does not fit this base model"
        )
    return out


def _blocks(model: nn.Module, config: BottleneckConfig) -> list[tuple[int, str, str]]:
    """``(layer index, AdapterHub location, peftkit module path)`` for every block ``config`` adapts."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LOCATIONS:
        raise AdapterLoadError(
            f"peftkit-bottleneck knows AdapterHub's adapter locations for model types {', '.join(sorted(LOCATIONS))} "
            f"only; {type(model).__name__} is model_type {model_type!r}"
        )
    if config.parallel_input == "block_input" and model_type not in POST_NORM_MODEL_TYPES:
        raise AdapterLoadError(
            f"AdapterHub's parallel adapters on model_type {model_type!r} read the residual stream before the "
            "feed-forward block's layer norm, and this adapter (BottleneckConfig.parallel_input='block_input') "
            "reads the block's input after it; AdapterHub's format cannot hold it, so save it in peftkit's "
            "format, or train one with parallel_input='residual'"
        )
    blocks = []
    for path, _, what in located_insertion_points(model, config):
        path = logical_path(path)
        layer = _LAYER.match(path)
        if layer is None or what not in LOCATIONS[model_type]:
            raise AdapterLoadError(f"peftkit-bottleneck cannot tell which AdapterHub location {path!r} is")
        blocks.append((int(layer["index"]), LOCATIONS[model_type][what], path))
    return blocks


def read_fusion(folder: Path, model: nn.Module | None) -> ForeignAdapter:
    """An AdapterHub AdapterFusion folder, as an ``adapter_fusion`` adapter named as AdapterHub named it."""
    from peftkit_bottleneck.fusion_config import AdapterFusionConfig

    where = repr(str(folder / FUSION_CONFIG_NAME))
    try:
        data = json.loads((folder / FUSION_CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise AdapterLoadError(f"{where} is not readable JSON ({exc})") from exc
    if not (isinstance(data, dict) and isinstance(data.get("config"), dict) and data.get("adapter_names")):
        raise AdapterLoadError(f"{where} has no AdapterFusion 'config' and 'adapter_names'")
    file, tensors = foreign_format.read_adapterhub_tensors(
        folder, FUSION_SAFE_WEIGHTS_NAME, FUSION_WEIGHTS_NAME
    )
    fused = list(data["adapter_names"])
    adapter = ForeignAdapter(
        format=FORMAT,
        method="adapter_fusion",
        file=file,
        source_config=data,
        source_tensors=tensors,
        name=data.get("name") or ",".join(fused),
    )
    if model is not None:
        try:
            adapter.config = AdapterFusionConfig.from_options(fused, data["config"])
        except (ValueError, ConfigError) as exc:
            raise AdapterLoadError(f"{where}: {exc}") from exc
        blocks = {place: path for path, place in _fusion_blocks(model, fused)}
        adapter.tensors = {}
        for key, tensor in tensors.items():
            match = _FUSION_KEY.match(key)
            if match is None:
                raise AdapterLoadError(f"{repr(str(file))} holds {key!r}, which is no fusion layer's tensor")
            path = blocks.get((int(match["index"]), match["location"]))
            if path is None:
                raise AdapterLoadError(
                    f"{repr(str(file))} holds {key!r}, for layer {match['index']}'s {match['location']!r} block, "
                    f"where this model holds not all of {fused}; load the fused adapters before their fusion"
                )
            adapter.tensors[f"base_model.model.{path}.adapter_fusion.{match['tensor']}"] = tensor
    return adapter


def _fusion_blocks(model: nn.Module, fused: list[str]) -> list[tuple[str, tuple[int, str]]]:
    """``(peftkit module path, (layer index, AdapterHub location))`` of each block holding every fused adapter."""
    from peftkit_bottleneck.layer import BottleneckLayer

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LOCATIONS:
        raise AdapterLoadError(
            f"peftkit-bottleneck knows AdapterHub's adapter locations for model types "
            f"{', '.join(sorted(LOCATIONS))} only; {type(model).__name__} is model_type {model_type!r}"
        )
    blocks = []
    for path, module in model.named_modules():
        if isinstance(module, BottleneckLayer) and all(name in module.placement for name in fused):
            path = logical_path(path)
            layer = _LAYER.match(path)
            kind = module.block_kind.get(fused[0])
            if layer is None or kind not in LOCATIONS[model_type]:
                raise AdapterLoadError(
                    f"peftkit-bottleneck cannot tell which AdapterHub location {path!r} is"
                )
            blocks.append((path, (int(layer["index"]), LOCATIONS[model_type][kind])))
    if not blocks:
        raise AdapterLoadError(
            f"this {type(model).__name__} holds the adapters {fused} together in no block; load the fused "
            "adapters (AdapterHub folders or peftkit ones) before their fusion"
        )
    return blocks


# --- writing ---------------------------------------------------------------------------------------------
def save(peft_model: Any, config: BottleneckConfig, adapter_name: str, folder: Path) -> None:
    """Write the adapter as AdapterHub's ``save_adapter`` does: config, ``pytorch_adapter.bin`` (what
    ``load_adapter`` reads by default) and ``adapter.safetensors`` (what it reads with use_safetensors=True)."""
    from peftkit.serialization import adapter_state_dict

    model = peft_model.base_model.model
    source_config = adapterhub_config.to_adapterhub(config, adapter_name)
    try:
        blocks = _blocks(model, config)
    except AdapterLoadError as exc:
        raise ConfigError(
            f"adapter {adapter_name!r} cannot be written in AdapterHub's format: {exc}"
        ) from exc
    state = adapter_state_dict(peft_model, adapter_name)
    tensors = {}
    for _, location, path in blocks:
        layer = _LAYER.match(path)["layer"]
        for ours, theirs in TENSOR_NAMES.items():
            tensors[f"{layer}.{location}.adapters.{adapter_name}.{theirs}"] = state[
                f"base_model.model.{path}.{ours}"
            ]
    data = foreign_format.adapterhub_folder_data(model, source_config, adapter_name, _writer())
    foreign_format.write_adapterhub_files(folder, data, tensors)


def save_fusion(peft_model: Any, config: Any, adapter_name: str, folder: Path) -> None:
    """Write a fusion as AdapterHub's ``save_adapter_fusion`` does."""
    from peftkit.serialization import adapter_state_dict

    model = peft_model.base_model.model
    state = adapter_state_dict(peft_model, adapter_name)
    tensors = {}
    for path, (_, location) in _fusion_blocks(model, config.adapter_names):
        layer = _LAYER.match(path)["layer"]
        prefix = f"base_model.model.{path}.adapter_fusion."
        for key, tensor in state.items():
            if key.startswith(prefix):
                tensors[f"{layer}.{location}.adapter_fusion_layer.{adapter_name}.{key[len(prefix) :]}"] = (
                    tensor
                )
    data = foreign_format.adapterhub_folder_data(
        model, config.options(), adapter_name, _writer(), adapter_names=list(config.adapter_names)
    )
    foreign_format.write_adapterhub_files(
        folder, data, tensors, FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME, FUSION_SAFE_WEIGHTS_NAME
    )


def _writer() -> str:
    from peftkit_bottleneck import __version__

    return f"peftkit-bottleneck.{__version__}"
