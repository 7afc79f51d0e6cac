"""AdapterHub's LoRA folders, read and written: what ``adapters``' ``save_adapter`` writes and ``load_adapter``
reads for a ``LoRAConfig`` adapter (architecture ``"lora"``).

The folder's layout is every AdapterHub method's (:mod:`peftkit.foreign_format`): ``adapter_config.json``
with the ``LoRAConfig`` under ``"config"``, the tensors in ``adapter.safetensors`` or ``pytorch_adapter.bin``.
Each adapted linear layer holds ``<layer path>.loras.<name>.lora_A`` (``(r, in)``) and ``.lora_B``
(``(out, r)``), the layouts of PEFT's ``lora_A.weight`` and ``lora_B.weight``, and AdapterHub adds
``dropout(x) Aᵀ Bᵀ · alpha / r``: PEFT's LoRA with ``lora_alpha=alpha``. Where it goes is fixed by the model
type (:data:`LAYOUTS`): ``selfattn_lora`` with ``attn_matrices`` (``"q"``, ``"k"``, ``"v"``) adapts the
self-attention's projections, ``intermediate_lora`` and ``output_lora`` one feed-forward projection each, in
every layer but those in ``leave_out``. Tensors are matched to the modules by layer index and place, so the
model class that saved them (``BertModel`` or ``BertForSequenceClassification``) does not matter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config import CONFIG_NAME
from peftkit.errors import AdapterLoadError, ConfigError
from peftkit.foreign_format import (
    ADAPTERHUB_FORMAT,
    ForeignAdapter,
    adapterhub_config,
    adapterhub_folder_data,
    adapterhub_head_notes,
    read_adapterhub_tensors,
    write_adapterhub_files,
)
from peftkit.injection import candidate_modules, logical_path
from torch import nn

from peftkit_lora.config import LoraConfig

FORMAT = ADAPTERHUB_FORMAT
ARCHITECTURE = "lora"
MTL_ARCHITECTURE = "mtl_lora"
ATTENTION = ("q", "k", "v")
PLACES = (*ATTENTION, "intermediate", "output")
# the AdapterHub option that puts a LoRA module at each place
PLACE_OPTIONS = {"q": "attn_matrices 'q'", "k": "attn_matrices 'k'", "v": "attn_matrices 'v'"} | {
    "intermediate": "intermediate_lora",
    "output": "output_lora",
}


@dataclass(frozen=True)
class Layout:
    """Where AdapterHub's LoRA goes in one model type: the transformer layers' list (its path in the base
    model) and, for each place, the adapted linear layer's path inside a layer."""

    layers: str
    places: dict[str, str]


_BERT = Layout(
    "encoder.layer",
    {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    },
)
# AdapterHub's Llama and Mistral mixins wrap down_proj as "intermediate" and up_proj as "output" (sic);
# gate_proj and o_proj are never adapted.
_LLAMA = Layout(
    "layers",
    {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "intermediate": "mlp.down_proj",
        "output": "mlp.up_proj",
    },
)
LAYOUTS: dict[str, Layout] = {"bert": _BERT, "roberta": _BERT, "llama": _LLAMA, "mistral": _LLAMA}

# LoRAConfig's fields and their defaults in adapters 1.3, as save_adapter writes them
LORA_DEFAULTS: dict[str, Any] = {
    "architecture": ARCHITECTURE,
    "selfattn_lora": True,
    "intermediate_lora": False,
    "output_lora": False,
    "leave_out": [],
    "r": 8,
    "alpha": 8,
    "dropout": 0.0,
    "attn_matrices": ["q", "v"],
    "composition_mode": "add",
    "init_weights": "lora",
    "init_weights_seed": None,
    "use_gating": False,
    "use_dora": False,
    "vera_d": None,
    "vera_b": None,
    "dtype": None,
}
# options read only at the value that leaves the feature out, with what the feature computes
ONLY_VALUE: dict[str, tuple[Any, str]] = {
    "composition_mode": (
        "add",
        "'scale' is AdapterHub's (IA)^3 (IA3Config): it multiplies the layer's output by a learned vector "
        "instead of adding scaling · B A x",
    ),
    "use_gating": (
        False,
        "a learned gate, the sigmoid of a linear map of the layer's input averaged over the sequence, "
        "scales each example's update",
    ),
    "use_dora": (
        False,
        "AdapterHub's DoRA normalises W + B A without the alpha / r scaling and rescales the layer's bias "
        "too, so PEFT's DoRA (use_dora=True) computes something else",
    ),
    "vera_d": (None, "VeRA: frozen random A and B shared by all layers, scaled by trained vectors d and b"),
    "vera_b": (None, "VeRA: frozen random A and B shared by all layers, scaled by trained vectors d and b"),
}
_INSTEAD = "load this adapter with AdapterHub's adapters library instead"
_SOURCE_TENSOR = re.compile(r"^(?P<module>.+)\.loras\.(?P<name>[^.]+)\.(?P<tensor>[^.]+(?:\.[^.]+)?)$")
TENSORS = ("lora_A", "lora_B")


# --- the config ------------------------------------------------------------------------------------------
def _refusal(where: str, option: str, value: Any, why: str, supported: str) -> AdapterLoadError:
    return AdapterLoadError(
        f"{where} sets the AdapterHub option {option}={value!r}, which peftkit-lora cannot represent ({why}); "
        f"peftkit-lora reads {supported} only: {_INSTEAD}"
    )


def check_options(source: Mapping[str, Any], where: str) -> None:
    """Refuse an AdapterHub LoRA config that peftkit-lora's LoRA cannot compute, naming the option."""
    if source.get("architecture") == MTL_ARCHITECTURE:
        raise _refusal(
            where,
            "architecture",
            MTL_ARCHITECTURE,
            "MTL-LoRA mixes several up projections with learned per-task weights",
            "architecture='lora'",
        )
    for option, (only, why) in ONLY_VALUE.items():
        value = source.get(option, only)
        if value != only:
            raise _refusal(where, option, value, why, f"{option}={only!r}")
    matrices = source.get("attn_matrices", LORA_DEFAULTS["attn_matrices"])
    if not isinstance(matrices, list) or any(m not in ATTENTION for m in matrices):
        raise _refusal(
            where,
            "attn_matrices",
            matrices,
            "AdapterHub 1.3 adapts the query, key and value projections only",
            "a list of 'q', 'k' and 'v'",
        )
    leave_out = source.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in leave_out
    ):
        raise _refusal(
            where, "leave_out", leave_out, "it names layers by their index", "a list of layer indices"
        )


def adapted_places(source: Mapping[str, Any]) -> list[str]:
    """The places (of :data:`PLACES`) that AdapterHub's config ``source`` adapts in each layer it does not leave out."""
    places = []
    if source.get("selfattn_lora", True):
        matrices = source.get("attn_matrices", LORA_DEFAULTS["attn_matrices"])
        places += [m for m in ATTENTION if m in matrices]
    if source.get("intermediate_lora", False):
        places.append("intermediate")
    if source.get("output_lora", False):
        places.append("output")
    return places


def init_note(source: Mapping[str, Any]) -> list[str]:
    init = source.get("init_weights", "lora")
    if init == "lora":
        return []
    return [
        f"init_weights={init!r}: peftkit-lora has no such init; the saved weights load as they are, and a new "
        "adapter made from the loaded config starts at PEFT's default (A Kaiming-uniform, B zero), which is "
        "AdapterHub's init_weights='lora'"
    ]


def from_adapterhub(source: Mapping[str, Any], where: str, target_modules: str) -> LoraConfig:
    """A :class:`LoraConfig` that computes what AdapterHub's LoRA config ``source`` computes on the modules
    ``target_modules`` names. ``where`` names the file in errors."""
    check_options(source, where)
    try:
        return LoraConfig(
            r=source.get("r", LORA_DEFAULTS["r"]),
            lora_alpha=source.get("alpha", LORA_DEFAULTS["alpha"]),
            lora_dropout=source.get("dropout", 0.0),
            target_modules=target_modules,
            init_lora_weights=True,
            bias="none",
        )
    except ConfigError as exc:
        raise AdapterLoadError(f"{where}: the AdapterHub config does not fit peftkit-lora: {exc}") from exc


# --- where it goes -------------------------------------------------------------------------------------------
def layout_of(model: nn.Module) -> tuple[str, Layout]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise AdapterLoadError(
            f"peftkit-lora knows where AdapterHub's LoRA goes for model types {', '.join(sorted(LAYOUTS))} only; "
            f"{type(model).__name__} is model_type {model_type!r}: {_INSTEAD}"
        )
    return model_type, LAYOUTS[model_type]


def _place_pattern(
    layout: Layout, places: list[str] | tuple[str, ...], indices: str = r"\d+", named: bool = True
) -> str:
    """The regex of the modules at ``places`` in the layers ``indices``; ``named``: with the groups ``index``
    and ``inner`` (the module's path in its layer)."""
    index, inner = ("?P<index>", "?P<inner>") if named else ("?:", "?:")
    paths = "|".join(re.escape(layout.places[place]) for place in places)
    return rf"(?:.*\.)?{re.escape(layout.layers)}\.({index}{indices})\.({inner}{paths})"


def model_places(model: nn.Module, layout: Layout) -> tuple[dict[tuple[int, str], str], set[int]]:
    """Every place AdapterHub's LoRA can adapt in ``model``, ``(layer index, place) → module path``, and the
    indices of all its layers. Modules that adapters of other methods wrap are found by their own paths."""
    place_of = {inner: place for place, inner in layout.places.items()}
    pattern = re.compile(_place_pattern(layout, PLACES))
    layer = re.compile(rf"(?:.*\.)?{re.escape(layout.layers)}\.(?P<index>\d+)")
    found, indices = {}, set()
    for path, _ in candidate_modules(model):
        path = logical_path(path)
        match = pattern.fullmatch(path)
        if match is not None:
            found[int(match["index"]), place_of[match["inner"]]] = path
        match = layer.fullmatch(path)
        if match is not None:
            indices.add(int(match["index"]))
    return found, indices


def _targets(
    model: nn.Module, source: Mapping[str, Any], where: str
) -> tuple[str, dict[tuple[int, str], str]]:
    """The regex of the modules AdapterHub's config adapts in ``model`` (PEFT's ``target_modules``) and those
    modules, by ``(layer index, place)``."""
    model_type, layout = layout_of(model)
    places = adapted_places(source)
    found, indices = model_places(model, layout)
    leave_out = set(source.get("leave_out") or [])
    kept = sorted(indices - leave_out)
    targets = {(i, p): path for (i, p), path in found.items() if p in places and i in kept}
    if not targets:
        raise AdapterLoadError(
            f"{where} adapts no module of this {type(model).__name__} (model_type {model_type!r}): it adapts "
            f"{', '.join(PLACE_OPTIONS[p] for p in places) or 'no place'} in layers {kept}"
        )
    layer_indices = r"\d+" if not leave_out & indices else "|".join(str(i) for i in kept)
    return _place_pattern(layout, places, layer_indices, named=False), targets


# --- reading -----------------------------------------------------------------------------------------------
def read(folder: Path, model: nn.Module | None) -> ForeignAdapter | None:
    """An AdapterHub LoRA adapter folder; None for a folder that is none (another method's too)."""
    data = adapterhub_config(folder)
    if data is None or data["config"].get("architecture") not in (ARCHITECTURE, MTL_ARCHITECTURE):
        return None
    source = data["config"]
    where = repr(str(folder / CONFIG_NAME))
    file, tensors = read_adapterhub_tensors(folder)
    adapter = ForeignAdapter(
        format=FORMAT,
        method="lora",
        file=file,
        source_config=data,
        source_tensors=tensors,
        notes=adapterhub_head_notes(folder) + init_note(source),
        name=data["name"],
    )
    if model is None:  # peftkit inspect: what the folder holds, and why it would not load
        try:
            check_options(source, where)
        except AdapterLoadError as exc:
            adapter.notes.append(f"not loadable: {exc}")
        return adapter
    check_options(source, where)
    target_modules, targets = _targets(model, source, where)
    adapter.config = from_adapterhub(source, where, target_modules)
    adapter.tensors = peft_tensors(model, targets, tensors, repr(str(file)))
    return adapter


def peft_tensors(
    model: nn.Module, targets: dict[tuple[int, str], str], source: dict[str, Any], where: str
) -> dict[str, Any]:
    """AdapterHub's tensors under the PEFT keys of the modules ``targets`` names in ``model``."""
    _, layout = layout_of(model)
    place_of = {inner: place for place, inner in layout.places.items()}
    pattern = re.compile(_place_pattern(layout, PLACES))
    by_place: dict[tuple[int, str, str], tuple[str, Any]] = {}
    for key, tensor in source.items():
        match = _SOURCE_TENSOR.match(key)
        module = pattern.fullmatch(match["module"]) if match is not None else None
        if module is None or match["tensor"] not in TENSORS:
            raise AdapterLoadError(
                f"{where} holds tensor {key!r}, which is not one of a LoRA module's ({', '.join(TENSORS)}) at a "
                "place AdapterHub's LoRA adapts"
            )
        by_place[int(module["index"]), place_of[module["inner"]], match["tensor"]] = (key, tensor)
    out = {}
    for (index, place), path in sorted(targets.items()):
        for tensor in TENSORS:
            found = by_place.pop((index, place, tensor), None)
            if found is None:
                raise AdapterLoadError(
                    f"{where} has no {tensor!r} for layer {index}'s {layout.places[place]!r} "
                    f"({PLACE_OPTIONS[place]}), which the adapter's config implies for this {type(model).__name__}"
                )
            out[f"base_model.model.{path}.{tensor}.weight"] = found[1]
    if by_place:
        key = sorted(key for key, _ in by_place.values())[0]
        raise AdapterLoadError(
            f"{where} holds tensor {key!r} ({len(by_place)} unplaced in all), which no module the adapter's "
            f"config adapts in this {type(model).__name__} takes: the adapter does not fit this base model"
        )
    return out


# --- writing -----------------------------------------------------------------------------------------------
def to_adapterhub(
    peft_model: Any, config: LoraConfig, adapter_name: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """AdapterHub's LoRA config (every ``LoRAConfig`` field) for the adapter, and AdapterHub's tensor key
    for each of its PEFT keys."""
    from peftkit_lora.init import uses_base_weight
    from peftkit_lora.layer import LoraLayer

    def refuse(field: str, value: Any, why: str) -> ConfigError:
        return ConfigError(
            f"adapter {adapter_name!r} sets LoraConfig.{field}={value!r}, which AdapterHub's LoRA cannot hold "
            f"({why}); save it in peftkit's format instead: save_pretrained(folder)"
        )

    refused = {
        "use_dora": (config.use_dora, False, "AdapterHub's DoRA normalises and rescales differently"),
        "use_rslora": (config.use_rslora, False, "AdapterHub scales by alpha / r"),
        "lora_bias": (config.lora_bias, False, "AdapterHub's B has no bias"),
        "bias": (config.bias, "none", "AdapterHub's LoRA trains and saves no base-model bias"),
        "modules_to_save": (
            config.modules_to_save or None,
            None,
            "an AdapterHub adapter saves no other modules",
        ),
        "trainable_token_indices": (
            config.trainable_token_indices,
            None,
            "AdapterHub's LoRA has no token rows",
        ),
        "target_parameters": (config.target_parameters or None, None, "AdapterHub adapts linear layers only"),
    }
    for field, (value, allowed, why) in refused.items():
        if value != allowed:
            raise refuse(field, value, why)
    init = config.init_lora_weights
    if uses_base_weight(init) or init == "corda":
        raise refuse(
            "init_lora_weights",
            init,
            "this init rewrites the base model's weights, and an AdapterHub adapter applies to the original ones",
        )

    model = peft_model.base_model.model
    try:
        model_type, layout = layout_of(model)
    except AdapterLoadError as exc:
        raise ConfigError(
            f"adapter {adapter_name!r} cannot be written in AdapterHub's format: {exc}"
        ) from exc
    found, indices = model_places(model, layout)
    place_at = {path: key for key, path in found.items()}
    options = ", ".join(f"{layout.places[p]} ({PLACE_OPTIONS[p]})" for p in PLACES)
    adapted: dict[tuple[int, str], str] = {}
    ranks, alphas = set(), set()
    for path, layer in peft_model.adapter_layers():
        if not isinstance(layer, LoraLayer) or not layer.holds(adapter_name):
            continue
        path = logical_path(path)
        if path not in place_at or adapter_name not in layer.lora_A:
            raise ConfigError(
                f"adapter {adapter_name!r} adapts {path!r}, which AdapterHub's LoRA does not adapt on model_type "
                f"{model_type!r} (it adapts, in each layer: {options}); save it in peftkit's format instead: "
                "save_pretrained(folder)"
            )
        adapted[place_at[path]] = path
        ranks.add(layer.r[adapter_name])
        alphas.add(layer.lora_alpha[adapter_name])
    for field, values in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if len(values) > 1:
            raise refuse(
                field,
                getattr(config, field),
                f"AdapterHub gives every module one {'r' if field == 'rank_pattern' else 'alpha'}, "
                f"and this adapter's modules have {sorted(values)}",
            )
    places = [p for p in PLACES if any(p == place for _, place in adapted)]
    kept = sorted({index for index, _ in adapted})
    missing = sorted(found[i, p] for i in kept for p in places if (i, p) in found and (i, p) not in adapted)
    if missing:
        raise ConfigError(
            f"adapter {adapter_name!r} leaves {missing[0]!r} unadapted while adapting the same place in another "
            "layer: AdapterHub's LoRA adapts the same places in every layer it does not leave out; save it in "
            "peftkit's format instead: save_pretrained(folder)"
        )
    attention = [p for p in places if p in ATTENTION]
    source = {
        **LORA_DEFAULTS,
        "selfattn_lora": bool(attention),
        "attn_matrices": attention or LORA_DEFAULTS["attn_matrices"],
        "intermediate_lora": "intermediate" in places,
        "output_lora": "output" in places,
        "leave_out": sorted(indices - set(kept)),
        "r": ranks.pop(),
        "alpha": alphas.pop(),
        "dropout": config.lora_dropout,
    }
    keys = {}
    for path in adapted.values():
        for tensor in TENSORS:
            keys[f"base_model.model.{path}.{tensor}.weight"] = f"{path}.loras.{adapter_name}.{tensor}"
    return source, keys


def save(peft_model: Any, config: LoraConfig, adapter_name: str, folder: Path) -> None:
    """Write the adapter as AdapterHub's ``save_adapter`` does (see :func:`peftkit.foreign_format.write_adapterhub_files`)."""
    from peftkit.serialization import adapter_state_dict

    from peftkit_lora import __version__

    source, keys = to_adapterhub(peft_model, config, adapter_name)
    state = adapter_state_dict(peft_model, adapter_name)
    left = sorted(set(state) - set(keys))
    if left:
        raise ConfigError(
            f"adapter {adapter_name!r} holds {left[0]!r} ({len(left)} in all), which AdapterHub's LoRA cannot hold; "
            "save it in peftkit's format instead: save_pretrained(folder)"
        )
    data = adapterhub_folder_data(
        peft_model.base_model.model, source, adapter_name, f"peftkit-lora.{__version__}"
    )
    write_adapterhub_files(folder, data, {theirs: state[ours] for ours, theirs in keys.items()})
