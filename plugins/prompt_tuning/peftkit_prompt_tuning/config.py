"""PromptTuningConfig: PEFT's prompt-tuning fields, names, defaults and meaning."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.config import PeftConfig, TaskType, check_choice, check_positive_int, fail

INIT_CHOICES = ("RANDOM", "TEXT", "SAMPLE_VOCAB")

# The model-shape fields PEFT derives from the model's config at injection when they are None.
SHAPE_FIELDS = ("token_dim", "num_attention_heads", "num_layers")


@dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings are placed before the input embeddings.

    ``prompt_tuning_init`` picks their start: ``"RANDOM"`` (a standard normal draw), ``"TEXT"`` (the
    word embeddings of ``prompt_tuning_init_text`` as the tokenizer at ``tokenizer_name_or_path`` splits
    it, repeated or cut to length), or ``"SAMPLE_VOCAB"`` (the embeddings of tokens drawn at random from
    the vocabulary). ``token_dim``, ``num_attention_heads`` and ``num_layers`` are read from the model's
    config at injection when left None; ``num_transformer_submodules`` becomes 2 for ``SEQ_2_SEQ_LM`` and
    1 otherwise. The saved tensor ``prompt_embeddings`` has
    ``num_virtual_tokens * num_transformer_submodules`` rows; as in PEFT, an encoder-decoder model reads
    only the first ``num_virtual_tokens`` of them, in front of the encoder's input.
    """

    method: ClassVar[str] = "prompt_tuning"

    peft_type: str = "PROMPT_TUNING"
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PROMPT_TUNING"  # as PEFT does, whatever was passed
        if self.task_type is None:
            raise fail(
                self,
                "task_type",
                None,
                f"one of {', '.join(repr(t.value) for t in TaskType)} (the task decides where the virtual tokens go)",
            )
        check_positive_int(self, "num_virtual_tokens")
        for name in SHAPE_FIELDS:
            if getattr(self, name) is not None:
                check_positive_int(self, name)
        self._check_submodules()
        if isinstance(self.prompt_tuning_init, enum.Enum):  # PEFT's PromptTuningInit
            self.prompt_tuning_init = self.prompt_tuning_init.value
        check_choice(self, "prompt_tuning_init", INIT_CHOICES)
        self._check_init_fields()

    def _check_submodules(self) -> None:
        value = self.num_transformer_submodules
        if value is None:
            return
        if isinstance(value, bool) or value not in (1, 2):
            raise fail(self, "num_transformer_submodules", value, "None, 1 or 2")
        if value == 2 and self.task_type != TaskType.SEQ_2_SEQ_LM:
            raise fail(
                self, "num_transformer_submodules", value, "None or 1 unless task_type is 'SEQ_2_SEQ_LM'"
            )

    def _check_init_fields(self) -> None:
        if isinstance(
            self.tokenizer_name_or_path, os.PathLike
        ):  # a folder given as a Path: saved as a string
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)
        text_init = self.prompt_tuning_init == "TEXT"
        if text_init:
            name = self.tokenizer_name_or_path
            if not isinstance(name, str) or not name:
                raise fail(
                    self,
                    "tokenizer_name_or_path",
                    name,
                    "a tokenizer name or folder when prompt_tuning_init='TEXT'",
                )
            if not isinstance(self.prompt_tuning_init_text, str):
                raise fail(
                    self,
                    "prompt_tuning_init_text",
                    self.prompt_tuning_init_text,
                    "a string when prompt_tuning_init='TEXT'",
                )
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise fail(
                self,
                "tokenizer_kwargs",
                self.tokenizer_kwargs,
                "None or a dict of AutoTokenizer.from_pretrained arguments",
            )
        if self.tokenizer_kwargs and not text_init:
            raise fail(
                self, "tokenizer_kwargs", self.tokenizer_kwargs, "None unless prompt_tuning_init='TEXT'"
            )
