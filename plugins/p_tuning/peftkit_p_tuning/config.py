"""PromptEncoderConfig: PEFT's P-tuning fields, names, defaults and meaning."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from typing import ClassVar

from peftkit.config import PeftConfig, TaskType, check_choice, check_positive_int, check_probability, fail

ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2  # PEFT's MLP always has two hidden layers, whatever encoder_num_layers says

# The model-shape fields read from the model's config at injection when they are None.
SHAPE_FIELDS = ("token_dim", "num_attention_heads", "num_layers")


@dataclass
class PromptEncoderConfig(PeftConfig):
    """P-tuning: ``num_virtual_tokens`` embeddings before the input, made by a trained prompt encoder.

    ``encoder_reparameterization_type`` picks the encoder: ``"MLP"`` (two hidden layers of width
    ``encoder_hidden_size``, ReLU) or ``"LSTM"`` (a bidirectional LSTM of ``encoder_num_layers`` layers
    and dropout ``encoder_dropout`` between them, then an MLP). ``encoder_hidden_size`` is the model's
    embedding width when None; ``token_dim``, ``num_attention_heads`` and ``num_layers`` are read from
    the model's config at injection when None, and ``num_transformer_submodules`` becomes 2 for
    ``SEQ_2_SEQ_LM`` and 1 otherwise. The saved tensor ``prompt_embeddings`` is the encoder's output,
    ``num_virtual_tokens * num_transformer_submodules`` rows, as PEFT saves it.
    """

    method: ClassVar[str] = "p_tuning"

    peft_type: str = "P_TUNING"
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "P_TUNING"  # as PEFT does, whatever was passed
        if self.task_type is None:
            raise fail(
                self,
                "task_type",
                None,
                f"one of {', '.join(repr(t.value) for t in TaskType)} (the task decides where the virtual tokens go)",
            )
        check_positive_int(self, "num_virtual_tokens")
        for name in (*SHAPE_FIELDS, "encoder_hidden_size"):
            if getattr(self, name) is not None:
                check_positive_int(self, name)
        self._check_submodules()
        if isinstance(self.encoder_reparameterization_type, enum.Enum):  # PEFT's enum
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.value
        check_choice(self, "encoder_reparameterization_type", ENCODER_TYPES)
        check_positive_int(self, "encoder_num_layers")
        check_probability(self, "encoder_dropout")
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != MLP_LAYERS:
            warnings.warn(
                f"{type(self).__name__}.encoder_num_layers={self.encoder_num_layers} is ignored for the MLP "
                f"encoder (as in PEFT): it always has {MLP_LAYERS} hidden layers",
                UserWarning,
                stacklevel=3,
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
