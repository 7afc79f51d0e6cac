"""diffusers' LoRA files, read without diffusers: which file, which key format, which components, which config.

A diffusers pipeline saves one ``pytorch_lora_weights.safetensors`` for all its models. Its keys are PEFT's
module keys under the component's name, ``unet.<module path>.lora_A.weight`` (``transformer.`` for a DiT,
``text_encoder.`` ...), and its safetensors metadata holds, under ``lora_adapter_metadata``, each component's
PEFT config as JSON, its fields prefixed the same way (``"unet.r": 4``). Files trained with kohya's scripts
key each module ``lora_unet_<module path with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

This module only reads; :mod:`peftkit.integrations.diffusers` (which imports diffusers) converts and loads.
``peftkit inspect`` uses it, so it imports neither diffusers nor torch at module level.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from peftkit.errors import AdapterLoadError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
DIFFUSERS, KOHYA = "diffusers", "kohya"
# kohya's key roots and the pipeline component each belongs to (as diffusers' conversion sorts them)
KOHYA_COMPONENTS = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# the names diffusers' pipelines give the models a LoRA file holds tensors for (pipeline.unet, ...)
COMPONENT_NAME = re.compile(
    r"(unet|transformer|text_encoder|prior|decoder|controlnet|connectors)(_\d+|_ref)?"
)
# the tensor names of a module's adapter, per peft_type, in diffusers' (PEFT's) keys
LORA_TENSORS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector")
LOKR_TENSORS = (".lokr_w1", ".lokr_w2", ".lokr_t2")


def find_lora_file(path: str | Path, weight_name: str | None = None) -> Path:
    """The safetensors file a diffusers LoRA ``path`` names: the file itself, or in a folder
    ``weight_name``, else ``pytorch_lora_weights.safetensors``, else the folder's only ``.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise AdapterLoadError(f"LoRA file or folder {str(path)!r} does not exist")
    if path.is_file():
        return path
    if weight_name is not None:
        if not (path / weight_name).is_file():
            raise AdapterLoadError(f"{str(path)!r} has no file {weight_name!r}")
        return path / weight_name
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    candidates = sorted(p.name for p in path.glob("*.safetensors"))
    if len(candidates) == 1:
        return path / candidates[0]
    if not candidates:
        raise AdapterLoadError(
            f"{str(path)!r} has no {WEIGHT_NAME} (nor any other .safetensors file): it is not a diffusers LoRA folder"
        )
    raise AdapterLoadError(
        f"{str(path)!r} holds several .safetensors files ({', '.join(candidates)}) and no {WEIGHT_NAME}; "
        "name the one to read with weight_name="
    )


def key_format(keys: list[str]) -> str | None:
    """``"kohya"`` when every key is kohya's (``lora_unet_...``, ``lora_te_...``), ``"diffusers"`` when the keys
    name PEFT's LoRA or LoKr tensors (or diffusers' older ``.lora.down``), None when neither."""
    if keys and all(key.startswith(tuple(KOHYA_COMPONENTS)) for key in keys):
        return KOHYA
    if any(tensor in key for key in keys for tensor in (*LORA_TENSORS, *LOKR_TENSORS, ".lora.down.")):
        return DIFFUSERS
    return None


def peft_type_of(keys: list[str]) -> str:
    """``"LOKR"`` for Kronecker-factor keys, ``"LORA"`` otherwise (diffusers loads these two kinds)."""
    return "LOKR" if any(tensor in key for key in keys for tensor in LOKR_TENSORS) else "LORA"


def components(keys: list[str], fmt: str) -> dict[str, int]:
    """Tensors per pipeline component (``{"unet": 24}``): the first part of a diffusers key, kohya's root."""
    return dict(sorted(Counter(component_of(key, fmt) for key in keys).items()))


def component_of(key: str, fmt: str) -> str:
    """The pipeline component a key belongs to; ``""`` for a key with no component prefix, as a model's own
    ``save_lora_adapter`` writes them."""
    if fmt == KOHYA:
        root = next(root for root in sorted(KOHYA_COMPONENTS, key=len, reverse=True) if key.startswith(root))
        return KOHYA_COMPONENTS[root]
    first = key.split(".", 1)[0]
    return first if COMPONENT_NAME.fullmatch(first) else ""


def component_tensors(tensors: dict[str, Any], fmt: str, component: str) -> dict[str, Any]:
    return {key: tensor for key, tensor in tensors.items() if component_of(key, fmt) == component}


def component_metadata(metadata: dict[str, str] | None, prefix: str | None) -> dict[str, Any] | None:
    """The PEFT config the file's metadata holds for one component (its fields without the prefix)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"the file's {METADATA_KEY!r} metadata is not valid JSON: {exc}") from exc
    if not prefix:
        return fields or None
    own = {
        key.removeprefix(f"{prefix}."): value for key, value in fields.items() if key.startswith(f"{prefix}.")
    }
    return own or None


def read_file_metadata(file: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{str(file)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from exc


def read_lora_file(file: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and the safetensors metadata of a LoRA file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = read_file_metadata(file)
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{str(file)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from exc
    return tensors, metadata


def no_lora_keys_message(source: str, keys: list[str]) -> str:
    """The error for a file that holds no LoRA: what its keys are, and what LoRA keys look like."""
    shown = ", ".join(repr(key) for key in keys[:3]) + (", ..." if len(keys) > 3 else "")
    return (
        f"{source} holds no LoRA tensors: diffusers' keys look like 'unet.<module>.lora_A.weight' "
        f"(or '.lokr_w1'), kohya's like 'lora_unet_<module>.lora_down.weight'; its keys are: {shown or 'none'}"
    )


def inferred_config(tensors: dict[str, Any], fmt: str) -> dict[str, Any]:
    """What a file without metadata says of its config: the ranks (and kohya's alphas) it holds."""
    if fmt == KOHYA:
        ranks = [t.shape[0] for key, t in tensors.items() if key.endswith(".lora_down.weight")]
        alphas = sorted({float(t) for key, t in tensors.items() if key.endswith(".alpha")})
        facts: dict[str, Any] = {"r": sorted(set(ranks))}
        if alphas:
            facts["alpha"] = alphas
        return facts
    ranks = [t.shape[1] for key, t in tensors.items() if ".lora_B." in key and t.ndim > 1]
    if ranks:
        return {"r": sorted(set(ranks))}
    return {}


def describe(path: str | Path) -> dict[str, Any]:
    """A diffusers or kohya LoRA file as ``peftkit inspect`` reports it: format, components, config, tensors."""
    file = find_lora_file(path)
    tensors, metadata = read_lora_file(file)
    keys = sorted(tensors)
    fmt = key_format(keys)
    if fmt is None:
        raise AdapterLoadError(no_lora_keys_message(repr(str(file)), keys))
    parts = components(keys, fmt)
    configs = {}
    for component in parts:
        saved = component_metadata(metadata, component)
        if saved is not None:
            configs[component] = saved
    if not configs:
        configs = {
            component: inferred_config(component_tensors(tensors, fmt, component), fmt) for component in parts
        }
    return {
        "file": file,
        "format": fmt,
        "peft_type": peft_type_of(keys),
        "components": parts,
        "config": configs,
        "config_source": "metadata"
        if any(component_metadata(metadata, c) for c in parts)
        else "tensor shapes",
        "tensors": tensors,
        "metadata": {key: value for key, value in metadata.items() if key != METADATA_KEY},
    }
