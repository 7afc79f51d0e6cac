"""diffusers' LoRA files with peftkit models: write what ``pipeline.load_lora_weights`` reads, read what it reads.

``peftkit.get_peft_model`` adapts a diffusers model (``UNet2DConditionModel``, a DiT such as
``SD3Transformer2DModel``) as any other torch model. diffusers, though, keeps a LoRA for a pipeline in its
own file (see :mod:`peftkit.integrations.diffusers_format`), not in PEFT's adapter folder:

- :func:`save_lora_weights` writes a peftkit LoRA (or LoKr) adapter as that file, keys under the
  component's name (``prefix``) and the config in the file's metadata, so that
  ``pipeline.load_lora_weights(folder)`` and ``model.load_lora_adapter(folder, prefix=...)`` build the same
  adapter;
- :func:`load_lora_weights` reads such a file, or one with kohya's ``lora_unet_...`` keys (converted by
  diffusers' own key table, as ``load_lora_weights`` converts them), into a peftkit ``PeftModel``.

This module imports diffusers; ``import peftkit`` does not import it.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key
from diffusers.utils import convert_unet_state_dict_to_peft
from torch import nn

from peftkit import plugins, serialization
from peftkit.config import PeftConfig
from peftkit.errors import AdapterLoadError, ConfigError
from peftkit.injection import logical_path
from peftkit.integrations.diffusers_format import (
    DIFFUSERS,
    KOHYA,
    METADATA_KEY,
    WEIGHT_NAME,
    component_metadata,
    components,
    find_lora_file,
    key_format,
    no_lora_keys_message,
    peft_type_of,
    read_lora_file,
)
from peftkit.model import PeftModel, get_peft_model

__all__ = ["WEIGHT_NAME", "load_lora_weights", "save_lora_weights"]

# the methods whose PEFT-format files diffusers loads (load_lora_adapter: LoRA, and LoKr since 0.37)
EXPORTABLE = ("lora", "lokr")
# a module's adapter tensor names in PEFT's keys: everything after the module path
_TENSOR_SUFFIX = re.compile(
    r"\.(lora_[AB]\.(weight|bias)|lora_magnitude_vector(\.weight)?|lokr_(w1|w2|t2)(_a|_b)?)$"
)


# --- saving ---------------------------------------------------------------------------------------------
def save_lora_weights(
    peft_model: PeftModel,
    save_directory: str | os.PathLike,
    prefix: str = "unet",
    adapter_name: str | None = None,
    weight_name: str = WEIGHT_NAME,
) -> Path:
    """Write an adapter of ``peft_model`` as diffusers' LoRA file; returns the file's path.

    ``prefix`` is the pipeline component the model is: ``"unet"`` for a UNet, ``"transformer"`` for a DiT
    (``pipeline.transformer``), ``"text_encoder"``... The file, ``save_directory/pytorch_lora_weights.safetensors``,
    holds the adapter's tensors under PEFT's keys with ``prefix.`` in front of the module path, and its PEFT
    config, each field ``prefix.<field>``, as diffusers' ``lora_adapter_metadata``. ``adapter_name`` defaults to
    the active adapter. A LoRA file loads with ``pipeline.load_lora_weights(save_directory)`` or
    ``model.load_lora_adapter(save_directory, prefix=prefix)``; a LoKr file with ``load_lora_adapter`` only
    (diffusers' Stable Diffusion pipelines accept LoRA keys only). Other files in the folder are kept.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"save_lora_weights takes a peftkit PeftModel (from peftkit.get_peft_model), got {type(peft_model).__name__}"
        )
    name = adapter_name if adapter_name is not None else peft_model.active_adapter
    peft_model._check_known([name])
    config = peft_model.peft_config[name]
    spec = plugins.method_for_config(config)
    if spec.name not in EXPORTABLE:
        raise ConfigError(
            f"adapter {name!r} is a {spec.name} adapter; diffusers loads LoRA and LoKr adapters only. Keep it "
            "in peftkit's format: peft_model.save_pretrained(folder), then PeftModel.from_pretrained(model, folder)"
        )
    if config.modules_to_save:
        raise ConfigError(
            f"adapter {name!r} trains whole modules ({config.modules_to_save}), which a diffusers LoRA file "
            "cannot hold; save it with save_pretrained instead"
        )
    _check_prefix(peft_model.get_base_model(), prefix)
    state = serialization.adapter_state_dict(peft_model, name)
    tensors = {f"{prefix}.{key.removeprefix(spec.key_root)}": tensor for key, tensor in state.items()}
    fields = {f"{prefix}.{field}": value for field, value in config.to_dict().items()}
    from peftkit import __version__

    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps(fields, indent=2, sort_keys=True),
        "peftkit.version": __version__,
        "peftkit.method": spec.name,
    }
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save a LoRA file into {str(folder)!r}: it is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return _write_atomically(folder / weight_name, tensors, metadata)


def _check_prefix(model: nn.Module, prefix: str) -> None:
    """``prefix`` names a pipeline component; for a UNet or a DiT, the one diffusers loads that model as."""
    if not isinstance(prefix, str) or not prefix or "." in prefix:
        raise ConfigError(
            f"prefix must be the pipeline component's name, such as 'unet' or 'transformer', got {prefix!r}"
        )
    expected = expected_prefix(model)
    # a pipeline may hold several models of a kind ("transformer_2"): only the other kind's name is wrong
    wrong = prefix == "unet" if expected == "transformer" else prefix.startswith("transformer")
    if expected is not None and wrong:
        raise ConfigError(
            f"a {type(model).__name__} is a pipeline's {expected!r} (pipeline.{expected}); got prefix={prefix!r}, "
            f"under which pipeline.load_lora_weights would find no tensors for it. Use prefix={expected!r}"
        )


def expected_prefix(model: nn.Module) -> str | None:
    """The pipeline component a diffusers model is: ``"unet"`` for its UNets, ``"transformer"`` for its
    transformer (DiT) models; None for any other model (a text encoder: the caller knows)."""
    module = type(model).__module__
    if not module.startswith("diffusers.models."):
        return None
    if module.startswith("diffusers.models.unets."):
        return "unet"
    if module.startswith(("diffusers.models.transformers.", "diffusers.models.transformer_")):
        return "transformer"
    return None


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    ready = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in tensors.items()}
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.saving-", dir=path.parent)
    os.close(handle)
    try:
        save_file(ready, staging, metadata=metadata)
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- loading --------------------------------------------------------------------------------------------
def load_lora_weights(
    model: nn.Module,
    path: str | os.PathLike | dict[str, torch.Tensor],
    prefix: str | None = "unet",
    adapter_name: str = "default",
    is_trainable: bool = False,
    weight_name: str | None = None,
) -> PeftModel:
    """Load a diffusers LoRA file (diffusers' keys or kohya's) into ``model``, as a peftkit adapter.

    ``path`` is the file, a folder holding it (``pytorch_lora_weights.safetensors``, or the folder's only
    ``.safetensors``; else name it with ``weight_name``), or a state dict. ``prefix`` picks the component's
    tensors (``"unet"``, ``"transformer"``...; None when the keys have no component prefix, as
    ``model.save_lora_adapter`` writes them). kohya's keys (``lora_unet_...``) are a UNet's: their modules
    are named by diffusers' conversion table and each module's ``alpha`` sets its scale, as diffusers does.
    The config comes from the file's metadata where diffusers (or :func:`save_lora_weights`) wrote one;
    otherwise each module's rank from its tensors and, as diffusers reads such files, scale 1 (alpha = rank).

    ``model`` may be a plain diffusers model, which comes back wrapped in a new ``PeftModel`` with this
    adapter active, or a ``PeftModel``, which gets one more adapter (not activated, as ``load_adapter``).
    """
    if isinstance(path, dict):
        source, tensors, metadata = "the state dict", dict(path), {}
    else:
        file = find_lora_file(path, weight_name)
        source = repr(str(file))
        tensors, metadata = read_lora_file(file)
    keys = sorted(tensors)
    fmt = key_format(keys)
    if fmt is None:
        raise AdapterLoadError(no_lora_keys_message(source, keys))
    if fmt == KOHYA:
        state, alphas = _from_kohya(tensors, prefix, source)
        saved_config = None
    else:
        state = _component_tensors(tensors, prefix, source)
        saved_config = component_metadata(metadata, prefix)
        alphas = {}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    modules = _modules_of(state)
    _check_modules_exist(base, modules, source, prefix)
    config = _config_for(state, modules, saved_config, alphas, source)
    config.inference_mode = not is_trainable
    spec = plugins.method_for_config(config)
    ready = {f"{spec.key_root}{key}": tensor for key, tensor in state.items()}
    if isinstance(model, PeftModel):
        model.add_adapter_from_tensors(adapter_name, config, ready)
        return model
    peft_model = get_peft_model(model, config, adapter_name)
    serialization.load_adapter_state_dict(peft_model, adapter_name, ready)
    return peft_model


def _component_tensors(
    tensors: dict[str, torch.Tensor], prefix: str | None, source: str
) -> dict[str, torch.Tensor]:
    """The tensors of one component, prefix dropped, under PEFT's keys (older diffusers keys converted)."""
    if prefix is not None:
        own = {
            key.removeprefix(f"{prefix}."): t for key, t in tensors.items() if key.startswith(f"{prefix}.")
        }
        if not own:
            found = [c for c in components(list(tensors), DIFFUSERS) if c]
            if not found:
                raise AdapterLoadError(
                    f"{source} holds no tensors under prefix {prefix!r}: its keys have no component prefix "
                    "(as a model's save_lora_adapter writes them); load it with prefix=None"
                )
            raise AdapterLoadError(
                f"{source} holds no tensors under prefix {prefix!r}; its keys start with "
                f"{', '.join(repr(c) for c in found)}: pass one of those as prefix"
            )
        tensors = own
    if peft_type_of(list(tensors)) == "LORA" and not any(".lora_A." in key for key in tensors):
        tensors = convert_unet_state_dict_to_peft(tensors)  # diffusers' older '.lora.down' keys, as it does
    return tensors


def _from_kohya(
    tensors: dict[str, torch.Tensor], prefix: str | None, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya's UNet keys as PEFT's, through diffusers' key conversion; and each module's alpha."""
    if prefix != "unet":
        held = ", ".join(repr(c) for c in components(list(tensors), KOHYA))
        raise AdapterLoadError(
            f"{source} has kohya's keys ('lora_unet_...'), which hold a UNet's LoRA (components: {held}); "
            f"load it into the UNet with prefix='unet', not prefix={prefix!r}"
        )
    state, alphas, used = {}, {}, set()
    for key, down in tensors.items():
        if not (key.startswith("lora_unet_") and key.endswith(".lora_down.weight")):
            continue
        lora_name = key.split(".", 1)[0]
        up_key, alpha_key = f"{lora_name}.lora_up.weight", f"{lora_name}.alpha"
        if up_key not in tensors:
            raise AdapterLoadError(f"{source} has {key!r} but no {up_key!r}: the file is incomplete")
        (peft_key,) = convert_unet_state_dict_to_peft({_convert_unet_lora_key(key): down})
        module = peft_key.removesuffix(".lora_A.weight")
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = down, tensors[up_key]
        used |= {key, up_key}
        if alpha_key in tensors:
            alphas[module] = float(tensors[alpha_key])
            used.add(alpha_key)
    rest = sorted(key for key in tensors if key.startswith("lora_unet_") and key not in used)
    if rest:
        raise AdapterLoadError(
            f"{source} holds kohya tensor {rest[0]!r} ({len(rest)} in all) that is no LoRA down, up or alpha "
            "tensor (DoRA's dora_scale, LoHa, LoKr): peftkit reads kohya's plain LoRA only"
        )
    if not state:
        raise AdapterLoadError(
            f"{source} has kohya's keys but no 'lora_unet_...' tensors: no LoRA for a UNet"
        )
    return state, alphas


def _modules_of(state: dict[str, torch.Tensor]) -> list[str]:
    modules = set()
    for key in state:
        match = _TENSOR_SUFFIX.search(key)
        if match is None:
            raise AdapterLoadError(
                f"tensor {key!r} is no LoRA or LoKr tensor of a module (lora_A, lora_B, lokr_w1...)"
            )
        modules.add(key[: match.start()])
    return sorted(modules)


def _check_modules_exist(model: nn.Module, modules: list[str], source: str, prefix: str | None) -> None:
    present = {logical_path(path) for path, _ in model.named_modules()}
    missing = [module for module in modules if module not in present]
    if missing:
        raise AdapterLoadError(
            f"{source} adapts module {missing[0]!r} ({len(missing)} of {len(modules)} modules missing), which this "
            f"{type(model).__name__} does not have: the LoRA was made for another model"
            + (f" or another component than {prefix!r}" if prefix is not None else "")
        )


def _config_for(
    state: dict[str, torch.Tensor],
    modules: list[str],
    saved: dict[str, Any] | None,
    alphas: dict[str, float],
    source: str,
) -> PeftConfig:
    peft_type = peft_type_of(list(state))
    config_class = plugins.method_for_peft_type(peft_type).config_class
    if saved is not None:
        # the tensors say which modules are adapted, as diffusers (PEFT's injection from a state dict) reads it
        selection = (
            "peft_type",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
        )
        fields = {key: value for key, value in saved.items() if key not in selection}
        return config_class.from_dict({**fields, "peft_type": peft_type, "target_modules": modules})
    if peft_type != "LORA":
        raise AdapterLoadError(
            f"{source} holds LoKr tensors but no {METADATA_KEY!r} metadata with their config; peftkit reads "
            "LoKr files that carry it (as save_lora_weights and diffusers' save_lora_adapter write them)"
        )
    ranks = {module: state[f"{module}.lora_B.weight"].shape[1] for module in modules}
    # diffusers' rule for a file without a config: scale 1 (alpha = rank) unless kohya's alpha says otherwise
    module_alphas = {module: alphas.get(module, float(rank)) for module, rank in ranks.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(module_alphas.values()).most_common(1)[0][0]
    exact = {module: f"^{re.escape(module)}" for module in modules}
    return config_class(
        r=r,
        lora_alpha=alpha,
        target_modules=modules,
        rank_pattern={exact[m]: rank for m, rank in ranks.items() if rank != r},
        alpha_pattern={exact[m]: a for m, a in module_alphas.items() if a != alpha},
    )
