"""Loading a saved LoRA adapter onto the reference model, and hot-swapping a same-shaped one in place.

Load: ``PeftModel.from_pretrained(base, folder)`` on a fresh copy of the base model (the copy is made
before the timed part). Hot-swap: a loaded adapter takes a second saved adapter's weights, PEFT's
``hotswap_adapter`` against peftkit's, alternating between the two folders. A swap re-injects nothing:
the run checks that every module of the model is the same object before and after.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import peft
import peftkit
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap

from benchmarks.common import LORA_TARGETS, interleaved, reference_model


def _saved_adapters(folder: Path) -> list[Path]:
    """Two adapters of the same shape with different random weights, saved in PEFT's format."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False)
        model = peftkit.get_peft_model(reference_model("cpu"), config)
        paths.append(folder / f"adapter{seed}")
        model.save_pretrained(paths[-1])
    return paths


def run(device: str, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        first, second = _saved_adapters(Path(tmp))
        base = reference_model(device)
        fresh: dict[str, torch.nn.Module] = {}

        def copy_base(name):
            return lambda: fresh.__setitem__(name, copy.deepcopy(base))

        loads = interleaved(
            {
                "peftkit": lambda: peftkit.PeftModel.from_pretrained(fresh.pop("peftkit"), first),
                "PEFT": lambda: peft.PeftModel.from_pretrained(fresh.pop("PEFT"), first),
            },
            device,
            rounds,
            setup={"peftkit": copy_base("peftkit"), "PEFT": copy_base("PEFT")},
        )

        loaded = {
            "peftkit": peftkit.PeftModel.from_pretrained(copy.deepcopy(base), first),
            "PEFT": peft.PeftModel.from_pretrained(copy.deepcopy(base), first),
        }
        modules_before = {name: [id(m) for m in model.modules()] for name, model in loaded.items()}
        turn = {"peftkit": 0, "PEFT": 0}

        def swap(name, function):
            def call():
                turn[name] += 1
                function(loaded[name], str(second if turn[name] % 2 else first), "default")

            return call

        swaps = interleaved(
            {"peftkit": swap("peftkit", peftkit.hotswap_adapter), "PEFT": swap("PEFT", peft_hotswap)}, device, rounds
        )
        for name, model in loaded.items():
            assert [id(m) for m in model.modules()] == modules_before[name], f"{name}'s swap replaced modules"

    def row(what, timing, goal):
        return {
            "what": what,
            "figure": timing.ratio("peftkit", "PEFT"),
            "against": "PEFT",
            "goal": goal,
            "detail": f"peftkit {timing.median('peftkit') * 1e3:.1f} ms, PEFT {timing.median('PEFT') * 1e3:.1f} ms",
        }

    return [
        row("loading an adapter (from_pretrained)", loads, 1.0),
        row("hot-swapping a same-shaped adapter in place", swaps, 1.0),
    ]
