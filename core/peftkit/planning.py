"""Planning an adapter before training: which modules a method targets, and what it costs.

Everything here works on a model built from its ``config.json`` on the meta device: shapes and dtypes
without storage, so a 7B model is planned in seconds and no weight is read. ``peftkit targets`` and
``peftkit plan`` print what these functions return. The command line imports this module to build its
commands, so it stays light at import: torch, transformers and the core modules that need torch are
imported inside the functions that use them, which keeps ``peftkit --help`` fast.

The training-memory estimate (see :func:`memory_estimate`) is, in bytes::

    base weights     = frozen parameters x bytes(dtype)
    adapter weights  = trainable parameters x bytes(their own dtype; LoRA keeps fp32)
    gradients        = the same as adapter weights (only trainable parameters get gradients)
    AdamW states     = trainable parameters x 8 (two fp32 moments)
    activations      = L x [b*s*(4h + 2q + 2kv + 3i) + b*n*s^2] x bytes(dtype)
                       + 2*b*s*h x bytes(dtype)    (final norm)
                       + b*s*V x 4                 (fp32 logits for the loss)

with L layers, b batch size, s sequence length, h hidden size, n attention heads, q = n x head_dim,
kv = key/value heads x head_dim, i the MLP's intermediate size, V the vocabulary size.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftkit import __version__, plugins
from peftkit.errors import ConfigError, PeftkitError

MODEL_CONFIG_NAME = "config.json"

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}

# the transformers head class that fits a PEFT task_type, used when config.json names no architecture
TASK_MODEL_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}

ACTIVATION_FORMULA = {
    "per_layer_elements": "b*s*(4h + 2q + 2kv + 3i) + b*n*s^2",
    "per_layer_terms": (
        "attention norm input and output (2h), q/k/v projections (q + 2kv), attention output (q), "
        "MLP norm input and output (2h), gate and up projections (2i), down projection input (i), "
        "softmax probabilities of eager attention (n*s per token)"
    ),
    "activations_bytes": "L * per_layer_elements * bytes(dtype) + 2*b*s*h * bytes(dtype) + b*s*V * 4",
    "symbols": (
        "L layers, b batch size, s sequence length, h hidden size, n attention heads, q = n*head_dim, "
        "kv = key/value heads*head_dim, i intermediate size, V vocabulary size"
    ),
    "base_weights_bytes": "frozen parameters * bytes(dtype)",
    "adapter_weights_bytes": "trainable parameters * bytes(their dtype)",
    "gradients_bytes": "trainable parameters * bytes(their dtype)",
    "optimizer_bytes": "trainable parameters * 8 (AdamW: two fp32 moments)",
    "notes": (
        "an estimate for decoder-only transformers trained without activation checkpointing; "
        "SDPA or flash attention drop the b*n*s^2 term; non-gated MLPs store less than 3i"
    ),
}


class ModelFolderError(PeftkitError, ValueError):
    """A MODEL argument that is not a transformers model folder (or its config.json)."""


# --- the model, from its config ------------------------------------------------------------------
def config_path(model: str | Path) -> Path:
    """The config.json of a model folder (or the file itself), with clear errors for the usual mistakes."""
    path = Path(model)
    if not path.exists():
        raise ModelFolderError(f"model folder {str(path)!r} does not exist")
    if path.is_dir():
        path = path / MODEL_CONFIG_NAME
        if not path.is_file():
            raise ModelFolderError(
                f"{str(model)!r} has no {MODEL_CONFIG_NAME}: it is not a transformers model folder"
            )
    return path


def read_model_config(model: str | Path) -> Any:
    """The transformers config of a model folder, read offline."""
    from transformers import AutoConfig

    path = config_path(model)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelFolderError(f"{str(path)!r} has no 'model_type': it is not a transformers model config")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelFolderError(f"transformers cannot read {str(path)!r}: {exc}") from exc


def model_class(config: Any, task_type: str | None = None) -> Any:
    """The class to build: config.architectures[0] when transformers has it, else one for the task_type,
    else a causal LM when the model type has one, else the bare model."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if task_type is not None:
        name = TASK_MODEL_CLASSES.get(str(getattr(task_type, "value", task_type)))
        if name:
            return getattr(transformers, name)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def meta_model(config: Any, task_type: str | None = None) -> Any:
    """The model of ``config`` with every tensor on the meta device: shapes, no storage, no weights read."""
    import torch
    from transformers.utils import logging

    cls = model_class(config, task_type)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            if hasattr(cls, "_from_config"):
                return cls._from_config(config)  # a concrete class (from config.architectures)
            return cls.from_config(config)  # an Auto class
    finally:
        logging.set_verbosity(verbosity)


# --- the method config, from --option key=value ----------------------------------------------------
def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings as config keyword arguments: values are JSON when they parse, else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"option {pair!r} must be written key=value (e.g. r=16)")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def method_config(method: str, options: dict[str, Any]) -> Any:
    """The method's config built from ``options``; an unknown field or a bad value is a ConfigError."""
    config_class = plugins.method_named(method).config_class
    fields = sorted(f.name for f in dataclasses.fields(config_class) if f.init)
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigError(
                f"{config_class.__name__} has no field {key!r}{hint}; its fields: {', '.join(fields)}"
            )
    try:
        return config_class(**options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config_class.__name__}: {exc}") from exc


def config_summary(config: Any) -> str:
    """``LoraConfig(r=16, target_modules='all-linear')``: the fields that differ from their defaults."""
    changed = []
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        value = getattr(config, f.name)
        if value != default and f.name != "peft_type":
            changed.append(f"{f.name}={getattr(value, 'value', value)!r}")
    return f"{type(config).__name__}({', '.join(changed)})"


def inject_on_meta(model: Any, config: Any) -> Any:
    """``get_peft_model`` on a meta model; new adapter tensors are made on the meta device too."""
    import torch

    from peftkit.model import get_peft_model

    with torch.device("meta"):
        return get_peft_model(model, config)


# --- peftkit targets ----------------------------------------------------------------------------
def group_pattern(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", path)


def targetable_groups(model: Any, matched: set[str] | None = None) -> list[dict[str, Any]]:
    """The model's adaptable layers (those the layer hooks know), grouped by pattern and layer type."""
    from peftkit.injection import _innermost, candidate_modules, logical_path

    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for path, module in candidate_modules(model):
        base = _innermost(module)
        features = plugins.layer_features(base)
        if features is None:
            continue
        path = logical_path(path)
        key = (group_pattern(path), type(base).__name__)
        group = groups.setdefault(
            key,
            {
                "pattern": key[0],
                "name": path.split(".")[-1],
                "type": key[1],
                "kind": features.kind,
                "shapes": set(),
                "count": 0,
                "targeted": 0 if matched is not None else None,
            },
        )
        group["shapes"].add((features.in_features, features.out_features))
        group["count"] += 1
        if matched is not None and path in matched:
            group["targeted"] += 1
    rows = []
    for group in groups.values():
        shapes = group.pop("shapes")
        (in_features, out_features) = next(iter(shapes)) if len(shapes) == 1 else (None, None)
        rows.append({**group, "in_features": in_features, "out_features": out_features})
    return rows


def adapted_name(path: str, layer: Any) -> str:
    """What an adapter layer adapts: its module's path, or ``<path>.<parameter>`` for a layer that adapts one
    parameter of its module (it says which in ``parameter_name``, as LoRA's ``target_parameters`` layers do)."""
    from peftkit.injection import logical_path

    parameter = getattr(layer, "parameter_name", None)
    return f"{logical_path(path)}.{parameter}" if parameter else logical_path(path)


def parameter_groups(peft_model: Any, adapter_name: str = "default") -> list[dict[str, Any]]:
    """The parameters adapted as parameters (not through their module), grouped by pattern: shape, count,
    the base tensors' elements and the adapter's."""
    from peftkit.adapter_layer import adapter_layers

    groups: dict[str, dict[str, Any]] = {}
    for path, layer in adapter_layers(peft_model.base_model.model):
        parameter = getattr(layer, "parameter_name", None)
        if not parameter or not layer.holds(adapter_name):
            continue
        owner = layer.get_base_layer()
        tensor = getattr(owner, parameter)
        name = adapted_name(path, layer)
        group = groups.setdefault(
            group_pattern(name),
            {
                "pattern": group_pattern(name),
                "name": parameter,
                "type": type(owner).__name__,
                "shape": list(tensor.shape),
                "count": 0,
                "parameters": 0,
                "adapter_parameters": 0,
            },
        )
        group["count"] += 1
        group["parameters"] += tensor.numel()
        group["adapter_parameters"] += sum(p.numel() for _, p in layer.adapter_parameters(adapter_name))
    return list(groups.values())


def parameter_candidates(model: Any) -> list[dict[str, Any]]:
    """2-D and 3-D parameters of modules the layer hooks do not know (a fused MoE expert stack, a router),
    grouped by pattern: what ``target_parameters`` can adapt where ``target_modules`` cannot."""
    from peftkit.injection import _innermost, candidate_modules, logical_path

    groups: dict[str, dict[str, Any]] = {}
    for path, module in candidate_modules(model):
        owner = _innermost(module)
        if plugins.layer_features(owner) is not None:
            continue
        for name, tensor in owner.named_parameters(recurse=False):
            if tensor.dim() not in (2, 3):
                continue
            pattern = group_pattern(f"{logical_path(path)}.{name}")
            group = groups.setdefault(
                pattern,
                {"pattern": pattern, "name": name, "type": type(owner).__name__, "shape": list(tensor.shape)},
            )
            group["count"] = group.get("count", 0) + 1
            group["parameters"] = group.get("parameters", 0) + tensor.numel()
    return list(groups.values())


def _model_facts(model_arg: str | Path, config: Any, model: Any) -> dict[str, Any]:
    return {
        "model": str(model_arg),
        "model_class": type(model).__name__,
        "model_type": config.model_type,
    }


def _task_type(options: dict[str, Any]) -> str | None:
    task = options.get("task_type")
    return task if isinstance(task, str) else None


def targets_report(model_arg: str | Path, method: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """What ``peftkit targets --json`` prints: the targetable layer groups and, with a method, its matches."""
    from peftkit.injection import find_targets, logical_path, resolved_targets

    config = read_model_config(model_arg)
    if method:
        config_class = plugins.method_named(method).config_class
        if "target_modules" not in {f.name for f in dataclasses.fields(config_class)}:
            raise ConfigError(
                f"method {method!r} ({config_class.__name__}) does not target modules: it has no target_modules"
            )
    peft_config = method_config(method, options) if method else None
    model = meta_model(config, _task_type(options))
    report = _model_facts(model_arg, config, model)
    report_parameters = parameter_candidates(model)
    if peft_config is None:
        report["groups"] = targetable_groups(model)
        report["targetable"] = sum(g["count"] for g in report["groups"])
        report["parameters"] = report_parameters
        return report
    searched, injected = model, None
    on_parameters = bool(getattr(peft_config, "target_parameters", None))
    if peft_config.target_modules is None or on_parameters:
        # the method fills in its per-architecture default at injection: let it, on the meta model
        injected = inject_on_meta(model, dataclasses.replace(peft_config))
        peft_config.target_modules = injected.peft_config["default"].target_modules
        searched = injected.base_model.model
    # with target_parameters alone, no module is targeted
    no_modules = on_parameters and not peft_config.target_modules
    matched = [] if no_modules else [logical_path(p) for p in find_targets(searched, peft_config)]
    report["groups"] = targetable_groups(searched, set(matched))
    report["targetable"] = sum(g["count"] for g in report["groups"])
    report["parameters"] = report_parameters
    resolved = resolved_targets(searched, peft_config)
    report["method"] = {
        "name": method,
        "config": peft_config.to_dict(),
        "summary": config_summary(peft_config),
        "target_modules": resolved if isinstance(resolved, str) else sorted(resolved),
        "matched": matched,
        "matched_count": len(matched),
    }
    if on_parameters:
        report["method"]["parameters"] = parameter_groups(injected)
    return report


# --- peftkit plan ------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {  # name in the header, in the order safetensors sorts by (its dtype enum)
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64",
}  # fmt: skip
_DTYPE_ORDER = list(_SAFETENSORS_DTYPES)


def safetensors_size(tensors: dict[str, Any], metadata: dict[str, str]) -> int:
    """The exact size of the safetensors file these tensors (meta tensors will do) and metadata make.

    The format: 8 bytes of header length, a JSON header (metadata, then each tensor's dtype, shape and
    byte range, largest dtype first, then by name) padded with spaces to a multiple of 8, then the data.
    """
    order = sorted(
        tensors,
        key=lambda k: (-tensors[k].element_size(), -_DTYPE_ORDER.index(_dtype_name(tensors[k])), k),
    )
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[_dtype_name(tensor)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    header_bytes = len(text.encode()) + (-len(text.encode())) % 8
    return 8 + header_bytes + offset


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def adapter_metadata(peft_config: Any) -> dict[str, str]:
    """The safetensors metadata ``PeftModel.save_pretrained`` writes for an adapter of this config."""
    spec = plugins.method_for_config(peft_config)
    metadata = {"format": "pt", "peftkit.version": __version__, "peftkit.method": spec.name}
    if spec.distribution:
        metadata["peftkit.plugin"] = spec.distribution
    if spec.version:
        metadata["peftkit.plugin_version"] = spec.version
    return metadata


def normalize_dtype(dtype: str) -> str:
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPE_BYTES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return name


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_shape(config: Any) -> dict[str, int] | None:
    """The sizes the activation estimate needs, read from a transformers config (None if it lacks them)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _config_value(text_config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(text_config, "num_attention_heads", "n_head", "num_heads")
    layers = _config_value(text_config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _config_value(text_config, "vocab_size")
    if not all(isinstance(v, int) for v in (hidden, heads, layers, vocab)):
        return None
    intermediate = _config_value(text_config, "intermediate_size", "n_inner", "d_ff") or 4 * hidden
    head_dim = _config_value(text_config, "head_dim") or hidden // heads
    kv_heads = _config_value(text_config, "num_key_value_heads") or heads
    return {
        "layers": layers,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "attention_heads": heads,
        "key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
    }


def activation_bytes(shape: dict[str, int], dtype: str, batch_size: int, seq_len: int) -> int:
    """The activations training keeps for backward, by the formula in this module's docstring."""
    b, s, h, i = batch_size, seq_len, shape["hidden_size"], shape["intermediate_size"]
    n = shape["attention_heads"]
    q, kv = n * shape["head_dim"], shape["key_value_heads"] * shape["head_dim"]
    per_layer = b * s * (4 * h + 2 * q + 2 * kv + 3 * i) + b * n * s * s
    width = DTYPE_BYTES[dtype]
    return shape["layers"] * per_layer * width + 2 * b * s * h * width + b * s * shape["vocab_size"] * 4


def memory_estimate(
    frozen_params: int,
    trainable_bytes: int,
    trainable_params: int,
    shape: dict[str, int] | None,
    dtype: str,
    batch_size: int,
    seq_len: int,
) -> dict[str, Any]:
    """Training memory by part, in bytes: weights, gradients, AdamW states and activations."""
    parts = {
        "base_weights_bytes": frozen_params * DTYPE_BYTES[dtype],
        "adapter_weights_bytes": trainable_bytes,
        "gradients_bytes": trainable_bytes,
        "optimizer_bytes": trainable_params * 8,
        "activations_bytes": activation_bytes(shape, dtype, batch_size, seq_len) if shape else None,
    }
    total = sum(value for value in parts.values() if value is not None)
    return {
        "dtype": dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        **parts,
        "total_bytes": total,
        "model_shape": shape,
        "formula": ACTIVATION_FORMULA,
    }


def plan_report(
    model_arg: str | Path,
    method: str,
    options: dict[str, Any],
    dtype: str = "bf16",
    batch_size: int = 1,
    seq_len: int = 512,
) -> dict[str, Any]:
    """What ``peftkit plan --json`` prints: parameters, adapter file size and a training-memory estimate."""
    from peftkit import serialization
    from peftkit.adapter_layer import adapter_layers

    dtype = normalize_dtype(dtype)
    config = read_model_config(model_arg)
    peft_config = method_config(method, options)
    model = meta_model(config, _task_type(options))
    facts = _model_facts(model_arg, config, model)
    peft_model = inject_on_meta(model, peft_config)
    params = list(peft_model.parameters())
    trainable = [p for p in params if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    total_params = sum(p.numel() for p in params)
    tensors = serialization.adapter_state_dict(peft_model, "default")
    layers = adapter_layers(peft_model.base_model.model)
    adapted = sorted({adapted_name(path, layer) for path, layer in layers})
    # the last name of each; a parameter keeps its module's name too (experts.down_proj)
    short = {
        ".".join(adapted_name(path, layer).split(".")[-2 if getattr(layer, "parameter_name", None) else -1 :])
        for path, layer in layers
    }
    return {
        **facts,
        "method": method,
        "config": peft_config.to_dict(),
        "summary": config_summary(peft_config),
        "adapted_modules": len(adapted),
        "adapted_names": sorted(short),
        "adapted_parameters": parameter_groups(peft_model),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "trainable_percent": 100 * trainable_params / total_params if total_params else 0.0,
        "adapter_tensors": len(tensors),
        "adapter_dtypes": sorted({_dtype_name(t) for t in tensors.values()}),
        "adapter_bytes": safetensors_size(tensors, adapter_metadata(peft_config)),
        "memory": memory_estimate(
            total_params - trainable_params,
            sum(p.numel() * p.element_size() for p in trainable),
            trainable_params,
            model_shape(config),
            dtype,
            batch_size,
            seq_len,
        ),
    }
