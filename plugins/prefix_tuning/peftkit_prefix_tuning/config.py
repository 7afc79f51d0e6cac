"""PrefixTuningConfig: PEFT's prefix-tuning fields, names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.config import PeftConfig, TaskType, check_positive_int, fail

# The model-shape fields read from the model's config at injection when they are None.
SHAPE_FIELDS = ("token_dim", "num_attention_heads", "num_layers")


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning: ``num_virtual_tokens`` learned keys and values before those of every attention layer.

    ``token_dim``, ``num_attention_heads`` and ``num_layers`` describe the keys and values of one layer
    and are read from the model's config at injection when left None; for grouped-query attention
    (a config with ``num_key_value_heads``) they become the key/value width and head count, as PEFT
    sets them. ``num_transformer_submodules`` becomes 2 for ``SEQ_2_SEQ_LM`` and 1 otherwise.
    ``prefix_projection=True`` trains the prefix through an MLP of width ``encoder_hidden_size`` (the
    key/value width when None); what is saved is always the prefix itself, ``prompt_embeddings``.
    ``init_weights="zero"`` starts the prefix (or the MLP's last layer) at zero.
    """

    method: ClassVar[str] = "prefix_tuning"

    peft_type: str = "PREFIX_TUNING"
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PREFIX_TUNING"  # as PEFT does, whatever was passed
        if self.task_type is None:
            raise fail(
                self,
                "task_type",
                None,
                f"one of {', '.join(repr(t.value) for t in TaskType)} (the task decides how inputs are rewritten)",
            )
        check_positive_int(self, "num_virtual_tokens")
        for name in (*SHAPE_FIELDS, "encoder_hidden_size"):
            if getattr(self, name) is not None:
                check_positive_int(self, name)
        self._check_submodules()
        if not isinstance(self.prefix_projection, bool):
            raise fail(self, "prefix_projection", self.prefix_projection, "True or False")
        if self.init_weights not in (None, "zero"):
            raise fail(self, "init_weights", self.init_weights, "None (random) or 'zero'")
        if self.token_dim is not None and self.num_attention_heads is not None:
            if self.token_dim % self.num_attention_heads:
                raise fail(
                    self,
                    "token_dim",
                    self.token_dim,
                    f"a multiple of num_attention_heads ({self.num_attention_heads}): each head gets an equal share",
                )

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
