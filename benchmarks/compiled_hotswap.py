"""Recompiles when a compiled model hot-swaps LoRA adapters of other ranks and alphas.

The flow PEFT documents: load an adapter (r=8), ``prepare_model_for_compiled_hotswap(model,
target_rank=16)``, ``torch.compile(model)``, one forward (the compile), then ``hotswap_adapter(compiled,
folder, "default")`` five times, with adapters of ranks 4 to 16 and as many scales (alpha / r), each
swap followed by a forward. The figure counts the graphs compiled after the first forward (goal 0).
The forwards are inference (eval mode, no grad) on the reference batch; after each swap the compiled
output must be the eager one of the same model and must differ from the previous adapter's, else the
row reports the failure instead of a count.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import peft
import peftkit
import torch
from peft.utils import hotswap as peft_hotswap

from benchmarks.common import LORA_TARGETS, compiled_graphs, failure, reference_batch, reference_model

TARGET_RANK = 16
# (rank, alpha): the adapter loaded first, then the five swapped in; every scale alpha / r differs
ADAPTERS = [(8, 8), (4, 8), (16, 64), (12, 6), (6, 18), (10, 25)]


def _saved_adapters(folder: Path) -> list[Path]:
    """The adapters in PEFT's format, with random A and B (a fresh B = 0 would make every swap look alike)."""
    paths = []
    for seed, (rank, alpha) in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        config = peftkit.LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=False
        )
        paths.append(folder / f"r{rank}-alpha{alpha}")
        peftkit.get_peft_model(reference_model("cpu"), config).save_pretrained(paths[-1])
    return paths


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def count_recompiles(
    load: Callable, prepare: Callable, swap: Callable, folders: list[Path], device: str
) -> int:
    """Graphs compiled after the first forward, over the swaps; raises if a swap's output is wrong."""
    ids = reference_batch(device)
    torch._dynamo.reset()
    model = load(reference_model(device), folders[0]).eval()
    prepare(model, target_rank=TARGET_RANK)
    compiled = torch.compile(model)
    with torch.no_grad():
        previous = compiled(input_ids=ids).logits
        first = compiled_graphs()
        for folder in folders[1:]:
            swap(compiled, str(folder), "default", torch_device=device)
            logits = compiled(input_ids=ids).logits
            eager = model(input_ids=ids).logits
            if _relative(logits, eager) > 1e-3:
                raise AssertionError(f"after swapping in {folder.name}, compiled and eager outputs differ")
            if _relative(logits, previous) < 1e-3:
                raise AssertionError(f"swapping in {folder.name} left the outputs as they were")
            previous = logits
    torch._dynamo.reset()
    return compiled_graphs() - first


def run(device: str) -> list[dict]:
    what = (
        f"recompiles over {len(ADAPTERS) - 1} hot-swaps (ranks 4–16, different alphas) "
        "after prepare_model_for_compiled_hotswap"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folders = _saved_adapters(Path(tmp))
        try:
            theirs = str(
                count_recompiles(
                    peft.PeftModel.from_pretrained,
                    peft_hotswap.prepare_model_for_compiled_hotswap,
                    peft_hotswap.hotswap_adapter,
                    folders,
                    device,
                )
            )
        except Exception as exc:  # PEFT's figure is for reference: its failure is reported, not raised
            theirs = f"failed: {failure(exc)}"
        prepare = getattr(peftkit, "prepare_model_for_compiled_hotswap", None)
        figure = None
        if prepare is None:
            ours = "not available (peftkit has no prepare_model_for_compiled_hotswap)"
        else:
            try:
                figure = count_recompiles(
                    peftkit.PeftModel.from_pretrained, prepare, peftkit.hotswap_adapter, folders, device
                )
                ours = str(figure)
            except Exception as exc:
                ours = f"failed: {failure(exc)}"
    return [
        {
            "what": what,
            "figure": figure,
            "against": "count",
            "goal": 0,
            "detail": f"peftkit {ours}; PEFT {theirs}; compiled inference forward, checked against eager "
            "after each swap",
        }
    ]
