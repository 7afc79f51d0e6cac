"""TrainableTokensConfig: PEFT's trainable tokens fields, names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.config import PeftConfig, check_str_list, fail


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens: the rows ``token_indices`` of the targeted embedding get new, trainable values
    (one set per adapter); every other row stays frozen and untouched.

    ``target_modules``: the embedding to adapt (names, suffixes or a regex); None picks the model's input
    embedding (``get_input_embeddings()``), else ``"embed_tokens"``. An output head tied to that
    embedding (``tie_word_embeddings``) sees the same rows. ``init_weights``: True starts each row at its
    current value (the adapter changes nothing until trained); False draws them from a standard normal.
    """

    method: ClassVar[str] = "trainable_tokens"
    # PEFT 0.21's TrainableTokensConfig has no field beyond the ones below and PeftConfig's.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    peft_type: str = "TRAINABLE_TOKENS"
    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_str_list(self, "target_modules", allow_str=True)
        if isinstance(self.token_indices, tuple):
            self.token_indices = list(self.token_indices)
        indices = self.token_indices
        if not isinstance(indices, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise fail(self, "token_indices", indices, "a list of int token ids")
        if not indices:
            raise fail(
                self,
                "token_indices",
                indices,
                "a non-empty list of the token ids whose embedding rows train "
                "(e.g. [tokenizer.convert_tokens_to_ids('<new>')])",
            )
        if any(i < 0 for i in indices):
            raise fail(self, "token_indices", indices, "non-negative row indices of the embedding")
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise fail(self, "token_indices", indices, f"a list naming each token once ({repeated} repeat)")
        if not isinstance(self.init_weights, bool):
            raise fail(self, "init_weights", self.init_weights, "True or False")
