"""Which embedding gets trainable rows, putting them there, and giving a tied output head the same rows."""

from __future__ import annotations

from peftkit import AdapterLayer, TargetModulesError
from peftkit.injection import find_targets, logical_path
from torch import nn

from peftkit_trainable_tokens.config import TrainableTokensConfig
from peftkit_trainable_tokens.layer import TrainableTokensLayer


def default_target(model: nn.Module) -> str:
    """PEFT's default: the path of the model's input embedding, else ``"embed_tokens"``."""
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if get_input_embeddings is not None:
        embedding = get_input_embeddings()
        for path, module in model.named_modules():
            if module is embedding:
                return path
    return "embed_tokens"


def add_rows(
    model: nn.Module, config: TrainableTokensConfig, adapter_name: str, key_prefix: str = ""
) -> None:
    """Give every module the config targets trainable rows for ``adapter_name``, then tie the output head.

    ``key_prefix``: put before the rows' tensor name in the adapter's file (another method's rows are
    keyed as PEFT keys them in that method's file: LoRA's under ``token_adapter.``)."""
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        if not isinstance(module, TrainableTokensLayer):
            _check_wrappable(path, module)
            training = module.training
            module = TrainableTokensLayer(module)
            module.train(training)
            model.set_submodule(path, module)
        if module.tied_to is None:
            module.update_layer(adapter_name, config, logical_path(path))
            module.key_prefixes[adapter_name] = key_prefix
    _tie_output_head(model)


def _tie_output_head(model: nn.Module) -> None:
    """As PEFT does with ``tie_word_embeddings``: the output head that shares the input embedding's weight
    gets a layer that shares the embedding layer's rows, so its logits use the trained rows too."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (
        not isinstance(embedding, TrainableTokensLayer)
        or head is None
        or isinstance(head, TrainableTokensLayer)
    ):
        return
    if getattr(head, "weight", None) is not embedding.get_base_layer().weight:
        return  # not tied after all (the model was untied by hand)
    for path, module in model.named_modules():
        if module is head:
            tied = TrainableTokensLayer(head, tied_to=embedding)
            tied.train(head.training)
            model.set_submodule(path, tied)
            return


def _check_wrappable(path: str, module: nn.Module) -> None:
    if isinstance(module, AdapterLayer):
        raise TargetModulesError(
            f"TrainableTokensConfig.target_modules matched {path!r}, which another method's adapter "
            f"({type(module).__name__}) already wraps; add the trainable tokens adapter first"
        )
    if not isinstance(module, (nn.Embedding, nn.Linear)):
        raise TargetModulesError(
            f"TrainableTokensConfig.target_modules matched {path!r}, a {type(module).__name__}; trainable "
            "tokens adapts a token embedding (nn.Embedding) or an output head (nn.Linear): target the "
            "embedding (e.g. 'embed_tokens')"
        )
