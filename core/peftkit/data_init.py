"""Data-driven initialisation: an adapter that starts from what the model computes on data.

Some inits need more than the weights: LoRA's EVA starts A at the principal directions of each layer's
inputs over a few batches. The adapter is injected first, as any other (its config names the init);
:func:`initialize_from_data` then runs the data through the model, and the method's
``peftkit_initialize_from_data`` hook sets the adapter's tensors. Methods keep their PEFT names on top
(``peftkit_lora.initialize_lora_eva_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from peftkit import plugins
from peftkit.errors import AdapterNameError


def forward_batch(model: Any, batch: Any) -> Any:
    """One batch through the model: a dict as keyword arguments, a list or tuple as positional ones."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def initialize_from_data(
    model: Any,
    dataloader: Iterable[Any],
    adapter_name: str = "default",
    forward_fn: Callable[[Any, Any], Any] | None = None,
    show_progress_bar: bool = True,
    **options: Any,
) -> Any:
    """Initialise the adapter ``adapter_name`` of ``model`` (a :class:`peftkit.PeftModel`) from the batches
    of ``dataloader``, by its method's data-driven init; returns the model.

    ``forward_fn(model, batch)`` runs one batch (default: a dict as keyword arguments). ``options`` go to
    the method (EVA: ``prepare_model_inputs_fn``, ``prepare_layer_inputs_fn``, ``gather_distributed_inputs``).
    """
    from peftkit.model import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"initialize_from_data needs a peftkit PeftModel (from get_peft_model), got {type(model).__name__}"
        )
    if adapter_name not in model.peft_config:
        raise AdapterNameError(
            f"no adapter named {adapter_name!r}; this model has {sorted(model.peft_config)}"
        )
    if dataloader is None or isinstance(dataloader, (str, bytes, Mapping)):
        raise TypeError(
            f"initialize_from_data needs an iterable of batches (a dataloader), got {type(dataloader).__name__}"
        )
    if hasattr(dataloader, "__len__") and len(dataloader) == 0:
        raise ValueError("initialize_from_data: the dataloader is empty; it needs batches of model inputs")
    config = model.peft_config[adapter_name]
    answered = plugins.initialize_from_data(
        model, config, adapter_name, dataloader, forward_fn or forward_batch, show_progress_bar, dict(options)
    )
    if not answered:
        method = plugins.method_for_config(config).name
        raise ValueError(
            f"adapter {adapter_name!r} ({method}) has no data-driven initialisation: no plugin answered "
            "peftkit_initialize_from_data for it (LoRA's are EVA and CorDA: LoraConfig(init_lora_weights='eva' or 'corda'))"
        )
    return model
