"""LoRA's ``trainable_token_indices``: chosen rows of an embedding train beside the LoRA adapter.

The rows live in peftkit-trainable-tokens' layer, put on the embedding in PEFT's LoRA layout: the file
keys them ``<embedding>.token_adapter.trainable_tokens_delta``, and an output head tied to the input
embedding shares its rows without saving them again. A list of ids means the model's input embedding; a
dict names each embedding (full path or last names, as ``target_modules``) with its own rows. A head tied
to the input embedding shares one weight with it, so the dict may give it only the embedding's rows.
"""

from __future__ import annotations

from peftkit.adapter_layer import AdapterLayer
from peftkit.errors import TargetModulesError
from peftkit.injection import candidate_modules, logical_path
from torch import nn

from peftkit_lora.config import LoraConfig

# PEFT keeps a LoRA adapter's rows in a wrapper's submodule of this name
KEY_PREFIX = "token_adapter."


def add_trainable_tokens(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Give the embeddings that ``config.trainable_token_indices`` names their trainable rows."""
    try:
        from peftkit_trainable_tokens import TrainableTokensConfig
        from peftkit_trainable_tokens.targets import add_rows, default_target
    except ImportError:
        raise TargetModulesError(
            "LoraConfig.trainable_token_indices needs the trainable tokens plugin: "
            "pip install 'peftkit-lora[trainable-tokens]' (or peftkit-trainable-tokens)"
        ) from None
    indices = config.trainable_token_indices
    rows_by_path = _rows_by_path(
        model, indices if isinstance(indices, dict) else {default_target(model): indices}
    )
    embedding, head = _tied_pair(model)
    if head in rows_by_path and embedding in rows_by_path:
        if rows_by_path[head] != rows_by_path[embedding]:
            raise TargetModulesError(
                f"LoraConfig.trainable_token_indices gives the output head {head!r} the rows "
                f"{rows_by_path[head]} and the input embedding {embedding!r} the rows {rows_by_path[embedding]}, "
                "but the two are tied (one weight): name the same rows for both, or only the embedding's"
            )
        del rows_by_path[head]  # it gets the embedding's rows when add_rows ties it
    if embedding in rows_by_path and head is not None and _is_other_adapter(model.get_submodule(head)):
        raise TargetModulesError(
            f"LoraConfig.trainable_token_indices trains rows of {embedding!r}, whose tied output head {head!r} "
            "has a LoRA adapter too (target_modules names it): leave the head out of target_modules, or "
            "untie the model's embeddings first"
        )
    for path, rows in rows_by_path.items():
        tokens = TrainableTokensConfig(token_indices=list(rows), target_modules=[logical_path(path)])
        add_rows(model, tokens, adapter_name, key_prefix=KEY_PREFIX)


def _rows_by_path(model: nn.Module, rows_by_name: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each named embedding's path and rows, with clear errors for a name that matches nothing usable."""
    candidates = candidate_modules(model)
    out: dict[str, list[int]] = {}
    for name, rows in rows_by_name.items():
        matched = [
            (path, module)
            for path, module in candidates
            if logical_path(path) == name or logical_path(path).endswith("." + name)
        ]
        if not matched:
            embeddings = [
                logical_path(path) for path, module in candidates if isinstance(module, nn.Embedding)
            ]
            raise TargetModulesError(
                f"LoraConfig.trainable_token_indices names {name!r}, which matches no module of "
                f"{type(model).__name__}; its embeddings are {embeddings}"
            )
        for path, module in matched:
            if _is_other_adapter(module):
                raise TargetModulesError(
                    f"LoraConfig.trainable_token_indices names {name!r}, which already has a "
                    f"{type(module).__name__} adapter (target_modules names it too, or another adapter "
                    "wraps it): train its rows with trainable_token_indices, or the whole layer, not both"
                )
            out[path] = rows
    return out


def _tied_pair(model: nn.Module) -> tuple[str | None, str | None]:
    """The paths of the input embedding and of the output head tied to it (``tie_word_embeddings``)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None, None
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)() if hasattr(model, getter) else None
        if isinstance(module, AdapterLayer):  # already wrapped by another adapter's rows
            module = module.get_base_layer()
        found.append(next((p for p, m in candidate_modules(model) if _unwrapped(m) is module), None))
    return found[0], found[1]


def _is_other_adapter(module: nn.Module) -> bool:
    """An adapter layer other than trainable rows (which a second adapter's rows may join)."""
    return isinstance(module, AdapterLayer) and not hasattr(module, "trainable_tokens_delta")


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module
