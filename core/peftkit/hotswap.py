"""Hot-swapping: a loaded adapter takes another saved adapter's weights in place (PEFT's ``hotswap_adapter``).

No module is created or replaced and no parameter is rebound, so a compiled model's graphs and an
optimizer's references to the adapter's parameters stay valid. The saved adapter must be of the same
method and structure (rank, targets, ...); only the fields its layer class lists in
``AdapterLayer.hotswap_fields`` may differ (for LoRA: those that set the scaling). The mechanism, which
``PeftModel.load_adapter(..., hotswap=True)`` shares, is :mod:`peftkit.adapter_swap`.

A compiled model would still recompile where a swap changes a value its graphs were specialised on (a
LoRA scale is a Python float) or a shape (another rank). :func:`prepare_model_for_compiled_hotswap`, called
before compiling, removes both: each method pads and turns scalars into tensors through the
``peftkit_prepare_compiled_hotswap`` hook.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peftkit import plugins
from peftkit.adapter_swap import swap_adapter
from peftkit.config import PeftConfig
from peftkit.model import PeftModel

_CHECKS = ("error", "warn", "ignore")


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | Path,
    adapter_name: str = "default",
    torch_device: str | torch.device | None = None,
    subfolder: str | None = None,
    **_: Any,
) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` with those saved in ``model_name_or_path``.

    ``model`` is a :class:`~peftkit.PeftModel` (or ``torch.compile`` of one). The saved adapter, ours or
    PEFT's, must be of the same method and structure; a field that differs is an
    :class:`~peftkit.AdapterLoadError` naming it, raised before anything changes. The adapter keeps its
    name, its activation and its trainability; its config becomes the saved one. A merged adapter cannot
    be swapped (as in PEFT): call ``unmerge_adapter()`` first.
    """
    peft_model = _peft_model(model, "hotswap_adapter")
    folder = Path(model_name_or_path, subfolder) if subfolder else Path(model_name_or_path)
    swap_adapter(peft_model, folder, adapter_name, torch_device)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: PeftConfig | dict[str, PeftConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Get a model ready for hot-swaps that recompile nothing once it is compiled (PEFT's function).

    Call it after loading the adapter that later ones replace, and before ``torch.compile``. Each adapter
    whose method supports it is changed in place so that it computes what it did, while a later
    :func:`hotswap_adapter` (or ``set_adapter`` between adapters of one shape) changes no shape and no
    value that a compiled graph was specialised on. For LoRA: A and B are padded with zeros to
    ``target_rank``, so adapters of any rank up to it swap in, and each layer's scale becomes a tensor, so
    any alpha does. Saved files keep each adapter's own rank. Parameters are padded into the same
    ``Parameter`` objects: create an optimizer afterwards.

    :param target_rank: the largest rank of the adapters to be swapped in; None keeps the ranks (swaps
        must then have the same rank, or a smaller one).
    :param config: PEFT's argument: the given configs (one, or a dict of them) get ``r`` and every
        ``rank_pattern`` value set to ``target_rank``, for adapters you create from them later. The model's
        own adapters' configs stay as they are: they describe what ``save_pretrained`` writes.
    :param check_compiled: what to do if the model is already compiled, which makes the next call
        recompile: ``"error"`` (the default), ``"warn"``, or ``"ignore"``.
    """
    if check_compiled not in _CHECKS:
        raise ValueError(
            f"check_compiled must be one of {', '.join(map(repr, _CHECKS))}, got {check_compiled!r}"
        )
    if target_rank is not None and (
        isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1
    ):
        raise ValueError(
            "target_rank must be a positive int, the largest rank of the adapters you will swap in, "
            f"or None; got {target_rank!r}"
        )
    peft_model = _peft_model(model, "prepare_model_for_compiled_hotswap")
    if check_compiled != "ignore" and _is_compiled(model):
        message = (
            "prepare_model_for_compiled_hotswap was called on a model that is already compiled: it changes "
            "shapes and values the compiled graphs were specialised on, so the next call recompiles. Call it "
            "before torch.compile"
        )
        if check_compiled == "error":
            raise ValueError(message + " (or pass check_compiled='warn' or 'ignore')")
        warnings.warn(message, UserWarning, stacklevel=2)
    prepared = [
        name
        for name, adapter_config in peft_model.peft_config.items()
        if plugins.prepare_compiled_hotswap(peft_model, adapter_config, name, target_rank)
    ]
    if not prepared:
        methods = sorted({plugins.method_for_config(c).name for c in peft_model.peft_config.values()})
        raise ValueError(
            "no adapter of this model can be prepared for compiled hot-swaps: its methods "
            f"({', '.join(methods)}) do not support it (LoRA does). Hot-swaps of adapters of the same "
            "structure need no preparation"
        )
    if config is not None and target_rank is not None:
        _give_target_rank(config, target_rank, set(map(id, peft_model.peft_config.values())))


def _give_target_rank(config: PeftConfig | dict[str, PeftConfig], rank: int, own: set[int]) -> None:
    for each in config.values() if isinstance(config, dict) else [config]:
        if id(each) in own or not hasattr(each, "rank_pattern"):
            continue
        each.r = rank
        each.rank_pattern = {key: rank for key in each.rank_pattern}


def _peft_model(model: nn.Module, caller: str) -> PeftModel:
    peft_model = getattr(model, "_orig_mod", model)  # the module inside torch.compile's wrapper
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"{caller} needs a peftkit PeftModel (or torch.compile of one), got {type(model).__name__}"
        )
    return peft_model


def _is_compiled(model: nn.Module) -> bool:
    """``torch.compile(model)``'s wrapper, or a module compiled in place (``module.compile()``) inside."""
    return hasattr(model, "_orig_mod") or any(
        getattr(module, "_compiled_call_impl", None) is not None for module in model.modules()
    )
