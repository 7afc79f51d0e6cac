"""The base of every method's config: PEFT's common fields, validation helpers, and adapter_config.json I/O."""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftkit.errors import ConfigError

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """PEFT's task types. The task decides which head trains with the adapter and how prompts are added."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# The heads PEFT trains and saves with the adapter for each task (modules_to_save).
TASK_HEADS: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}

# Keys PEFT writes in every adapter_config.json that carry no meaning for loading here.
_PEFT_BOOKKEEPING_KEYS = frozenset({"peft_version"})


def fail(config: Any, field_name: str, value: Any, allowed: str) -> ConfigError:
    """The error for one bad field: names the class, the field, the value given and what is allowed."""
    return ConfigError(f"{type(config).__name__}.{field_name} must be {allowed}, got {value!r}")


def check_positive_int(config: Any, field_name: str, allow_zero: bool = False) -> None:
    value = getattr(config, field_name)
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise fail(config, field_name, value, f"an integer >= {lowest}")


def check_probability(config: Any, field_name: str) -> None:
    value = getattr(config, field_name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise fail(config, field_name, value, "a number in [0, 1)")


def check_choice(config: Any, field_name: str, choices: Iterable[Any]) -> None:
    value = getattr(config, field_name)
    choices = tuple(choices)
    if value not in choices:
        raise fail(config, field_name, value, f"one of {', '.join(repr(c) for c in choices)}")


def check_str_list(config: Any, field_name: str, allow_str: bool = False, allow_none: bool = True) -> None:
    """A field that holds module names: a list (or set) of strings, a regex string when allow_str, or None."""
    value = getattr(config, field_name)
    if value is None and allow_none:
        return
    if isinstance(value, str) and allow_str:
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        setattr(config, field_name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))
        return
    allowed = (
        "a list of module names"
        + (", a regex string" if allow_str else "")
        + (" or None" if allow_none else "")
    )
    raise fail(config, field_name, value, allowed)


def check_layer_selection(config: Any) -> None:
    """PEFT's ``layers_to_transform`` (a layer index or a list of them, only with a list of target names)
    and ``layers_pattern`` (the name of the layer list in module paths, only with layer indices)."""
    layers = config.layers_to_transform
    if layers is not None:
        values = [layers] if isinstance(layers, int) else layers
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise fail(
                config, "layers_to_transform", layers, "None, a layer index or a list of layer indices"
            )
        if isinstance(config.target_modules, str):
            raise fail(config, "layers_to_transform", layers, "None when target_modules is a regex string")
    if config.layers_pattern is not None:
        check_str_list(config, "layers_pattern", allow_str=True)
        if layers is None:
            raise fail(
                config, "layers_pattern", config.layers_pattern, "None unless layers_to_transform is set"
            )


@dataclass
class PeftConfig:
    """Fields every method shares, under PEFT's names.

    A method's config subclasses this, sets the class attributes ``method`` (the plugin's method name)
    and ``peft_type`` default, and validates its own fields in ``__post_init__`` (call ``super()``).
    ``peft_only_fields`` lists fields PEFT's config has that this method does not implement, with
    PEFT's default: a saved config with the default loads, any other value is a clear error.
    """

    method: ClassVar[str] = ""
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    task_type: TaskType | str | None = None
    peft_type: str = ""
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise fail(
                    self, "task_type", self.task_type, f"None or one of {[t.value for t in TaskType]}"
                ) from None
        check_str_list(self, "modules_to_save")
        if not isinstance(self.inference_mode, bool):
            raise fail(self, "inference_mode", self.inference_mode, "True or False")

    def required_adapters(self) -> list[str]:
        """Other adapters that must be on the model before this one is added (an AdapterFusion's fused
        adapters); ``from_pretrained(..., all_adapters=True)`` loads them first. Default: none."""
        return []

    # --- (de)serialising -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict PEFT writes: every field, enums as their values, sets as sorted lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build a config from a saved dict, PEFT's or ours.

        Fields PEFT has that this method does not implement load only at PEFT's default; other
        unknown keys are ignored with a warning, as PEFT does.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.peft_only_fields:
                default = cls.peft_only_fields[key]
                if value != default and not (value in (None, {}, []) and default in (None, {}, [])):
                    raise ConfigError(
                        f"{cls.__name__}: the adapter sets {key}={value!r}, a PEFT feature that peftkit's "
                        f"{cls.method!r} method does not implement (only {key}={default!r} is supported)"
                    )
            elif key not in _PEFT_BOOKKEEPING_KEYS:
                ignored.append(key)
        if ignored:
            warnings.warn(f"{cls.__name__} ignores unknown config keys {sorted(ignored)}", stacklevel=2)
        return cls(**kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        data = self.to_dict()
        data["inference_mode"] = True  # as PEFT writes it: a saved adapter loads for inference by default
        Path(directory, CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> PeftConfig:
        return dataclasses.replace(self, **changes)


def read_config_dict(directory: str | Path) -> dict[str, Any]:
    """The parsed adapter_config.json of an adapter folder, with clear errors for the usual mistakes."""
    from peftkit.errors import AdapterLoadError

    directory = Path(directory)
    if not directory.exists():
        raise AdapterLoadError(f"adapter folder {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{str(directory)!r} has no {CONFIG_NAME}: it is not an adapter folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterLoadError(f"{str(path)!r} has no 'peft_type': it is not an adapter config")
    return data


def heads_for_task(task_type: TaskType | None) -> tuple[str, ...]:
    return TASK_HEADS.get(task_type, ()) if task_type is not None else ()


def with_task_heads(config: PeftConfig) -> PeftConfig:
    """Add the task's head names to modules_to_save, as PEFT does for classification and QA."""
    heads = heads_for_task(config.task_type)
    if not heads:
        return config
    current = list(config.modules_to_save or [])
    config.modules_to_save = current + [h for h in heads if h not in current]
    return config


def default_field(value: Any) -> Any:
    """A dataclass default for a mutable value."""
    return field(default_factory=lambda: type(value)(value))
