"""Hot-swapping: a loaded adapter takes another saved adapter's weights in place (PEFT's ``hotswap_adapter``).

No module is created or replaced and no parameter is rebound, so a compiled model's graphs and an
optimizer's references to the adapter's parameters stay valid. The saved adapter must be of the same
method and structure (rank, targets, ...); only the fields its layer class lists in
``AdapterLayer.hotswap_fields`` may differ (for LoRA: those that set the scaling). The mechanism, which
``PeftModel.load_adapter(..., hotswap=True)`` shares, is :mod:`peftkit.adapter_swap`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.adapter_swap import swap_adapter
from peftkit.model import PeftModel


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
    peft_model = getattr(model, "_orig_mod", model)  # the module inside torch.compile's wrapper
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"hotswap_adapter needs a peftkit PeftModel, got {type(model).__name__}")
    folder = Path(model_name_or_path, subfolder) if subfolder else Path(model_name_or_path)
    swap_adapter(peft_model, folder, adapter_name, torch_device)
